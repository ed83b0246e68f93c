#!/usr/bin/env python3
"""Reference renders of real chat templates for tests/chat_template_test.cpp.

Renders every template under the chat_templates folder (../shared/tokenizers/chat_templates in a
developer checkout) with transformers' own renderer, `render_jinja_template` (what
`apply_chat_template` calls), for a fixed set of conversations, and writes one JSON file per
template source file into tests/fixtures/chat_templates/. Templates are never copied into the repo:
fixtures name them by path (+ index or key) and carry a 64-bit FNV-1a hash of the text so the C++
test notices when a shared template changes.

Run on the device machine (transformers + jinja2 there; ../shared does not travel, so copy it):
    mkdir -p .devdata && cp -r ../shared/tokenizers/chat_templates .devdata/
    # run tool, carry [".devdata/chat_templates"] (at most 8 files come back, hence the tarball):
    python3 tools/make_chat_template_fixtures.py --templates .devdata/chat_templates --out /tmp/ctfx \
      && tar czf $OUT/chat_template_fixtures.tgz -C /tmp/ctfx .
and unpack the tarball into tests/fixtures/chat_templates/.

Without transformers (--allow-jinja2-fallback) it builds the same jinja2 environment by hand; the
fixtures then say so in "renderer" and should be regenerated with transformers.

strftime_now is pinned to FIXED_NOW so "Today Date" lines are reproducible; the C++ test pins the
same time with ChatTemplate::set_fixed_time.
"""
import argparse
import datetime
import glob
import json
import os
import sys

FIXED_NOW = datetime.datetime(2025, 11, 27, 9, 30, 0)

# Special tokens: from the model's tokenizer_config where the source has one, otherwise the usual ones.
TOKENS = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>"),
    "qwen": ("<|endoftext|>", "<|im_end|>"),
    "gemma": ("<bos>", "<eos>"),
    "phi3": ("<s>", "<|endoftext|>"),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
}
LLAMA_CPP_TOKENS = {
    "Qwen-Qwen2.5-7B-Instruct": "qwen",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": "deepseek",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": "deepseek",
    "google-gemma-2-2b-it": "gemma",
    "meta-llama-Llama-3.1-8B-Instruct": "llama3",
    "meta-llama-Llama-3.2-3B-Instruct": "llama3",
    "meta-llama-Llama-3.3-70B-Instruct": "llama3",
    "microsoft-Phi-3.5-mini-instruct": "phi3",
    "mistralai-Mistral-Nemo-Instruct-2407": "mistral",
}
# ollama_template_index.json: Hugging Face Jinja templates, keyed by the ollama template name.
OLLAMA_TOKENS = {
    "chatml": ("<s>", "<|im_end|>"),
    "zephyr": ("<s>", "</s>"),
    "openchat": ("<s>", "<|end_of_turn|>"),
    "mistral-instruct": ("<s>", "</s>"),
    "starcoder2-instruct": ("<|endoftext|>", "<|endoftext|>"),
    "llama2-chat": ("<s>", "</s>"),
    "codellama-70b-instruct": ("<s>", "</s>"),
    "alpaca": ("<｜begin▁of▁sentence｜>", "<|EOT|>"),
    "chatqa": ("<|begin_of_text|>", "<|end_of_text|>"),
    "gemma-instruct": ("<bos>", "<eos>"),
    "gemma3-instruct": ("<bos>", "<eos>"),
    "llama3-instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "granite-instruct": ("<|endoftext|>", "<|endoftext|>"),
    "magicoder": ("<s>", "</s>"),
    "alfred": ("<s>", "</s>"),
    "phi-3": ("<s>", "<|endoftext|>"),
    "falcon-instruct": ("<|endoftext|>", "<|endoftext|>"),
    "solar-instruct": ("<s>", "</s>"),
    "command-r": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
}

# Message text meant to catch mistakes: surrounding spaces/newlines (templates `| trim` them),
# quotes, braces and tag-like text (data, never re-templated), non-ASCII (µ, α, ≥, –, emoji).
SYSTEM = "  You are a careful biomedical assistant.\n Answer in ≤ 3 sentences; use µg/mL units.  \n"
USER_1 = "\n What is the half-life of \"amoxicillin\" {approx}?  "
ASSISTANT_1 = "<think>\nRecall PK data.\n</think>\n\n  About 1–1.5 h (α-phase) 💊.\n\n"
USER_2 = "Thanks! And for 'ibuprofen'? Keep {{ braces }} and {% tags %} literally.\t"

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather — in °C.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. \"Zürich\""},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
        "return": {"type": "number", "description": "Temperature"},
    },
}]

CONVERSATIONS = {
    "system_user_assistant_user": {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": USER_1},
        {"role": "assistant", "content": ASSISTANT_1},
        {"role": "user", "content": USER_2},
    ]},
    "user_assistant_user": {"messages": [
        {"role": "user", "content": USER_1},
        {"role": "assistant", "content": ASSISTANT_1},
        {"role": "user", "content": USER_2},
    ]},
    "user": {"messages": [{"role": "user", "content": USER_1}]},
    "user_assistant": {"messages": [
        {"role": "user", "content": USER_1},
        {"role": "assistant", "content": ASSISTANT_1},
    ]},
    "tools": {"tools": TOOLS, "messages": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "What's the weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call12345", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}}]},
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "22.5"},
        {"role": "assistant", "content": "It is 22.5 °C in Zürich."},
        {"role": "user", "content": "Thanks!"},
    ]},
    "content_parts": {"messages": [
        {"role": "user", "content": [{"type": "text", "text": " Describe µ-opioid receptors. "}]},
    ]},
}
CASES = [  # (conversation, add_generation_prompt)
    ("system_user_assistant_user", False), ("system_user_assistant_user", True),
    ("user_assistant_user", False), ("user_assistant_user", True),
    ("user", False), ("user", True),
    ("user_assistant", False),
    ("tools", True),
    ("content_parts", True),
]


def fnv1a64(text):
    h = 0xCBF29CE484222325
    for b in text.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def fixed_strftime_now(fmt):
    return FIXED_NOW.strftime(fmt)


class Renderer:
    """transformers' render_jinja_template, or (fallback) the same jinja2 environment built by hand."""

    def __init__(self, allow_fallback):
        self.kind = None
        try:
            import transformers
            from transformers.utils import chat_template_utils as ctu
            import jinja2
            self.ctu = ctu
            self.kind = "transformers %s render_jinja_template, jinja2 %s" % (transformers.__version__, jinja2.__version__)
        except ImportError:
            if not allow_fallback:
                raise
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = fixed_strftime_now
            self.env = env
            self.ctu = None
            self.kind = "jinja2 %s environment built like transformers' (fallback, no transformers)" % jinja2.__version__

    def render(self, template, messages, tools, add_generation_prompt, bos, eos):
        if self.ctu is None:
            return self.env.from_string(template).render(
                messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
                bos_token=bos, eos_token=eos)
        # Pin strftime_now: the compiled template is lru_cached, so the environment we patch here is
        # the one render_jinja_template uses (checked below).
        compiled = self.ctu._compile_jinja_template(template)
        compiled.environment.globals["strftime_now"] = fixed_strftime_now
        assert self.ctu._compile_jinja_template(template) is compiled
        rendered, _ = self.ctu.render_jinja_template(
            conversations=[messages], tools=tools, documents=None, chat_template=template,
            add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)
        return rendered[0]


def load_sources(root):
    """Yields (fixture_name, [template entries]) per template source file."""
    sources = []
    for path in sorted(glob.glob(os.path.join(root, "llama.cpp-models", "*.jinja"))):
        stem = os.path.basename(path)[:-len(".jinja")]
        rel = os.path.relpath(path, root)
        bos, eos = TOKENS[LLAMA_CPP_TOKENS[stem]]
        sources.append((stem, [dict(id=rel, path=rel, text=open(path, encoding="utf-8").read(), bos=bos, eos=eos)]))
    for name in ("mistral-common_v1_spm", "mistral-common_v3_spm"):
        rel = name + ".jinja"
        text = open(os.path.join(root, rel), encoding="utf-8").read()
        bos, eos = TOKENS["mistral"]
        sources.append((name, [dict(id=rel, path=rel, text=text, bos=bos, eos=eos)]))
    rel = "llama-3-8b-instruct.tokenizer_config.json"
    config = json.load(open(os.path.join(root, rel), encoding="utf-8"))
    sources.append(("llama-3-8b-instruct", [dict(id=rel + "#chat_template", path=rel, key="chat_template",
                                                 text=config["chat_template"], bos=config["bos_token"],
                                                 eos=config["eos_token"])]))
    rel = "ollama_template_index.json"
    entries = []
    for i, item in enumerate(json.load(open(os.path.join(root, rel), encoding="utf-8"))):
        bos, eos = OLLAMA_TOKENS[item["name"]]
        entries.append(dict(id="%s#%d" % (rel, i), path=rel, index=i, name=item["name"], text=item["template"],
                            bos=bos, eos=eos))
    sources.append(("ollama_template_index", entries))
    return sources


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--templates", required=True, help="the chat_templates folder")
    ap.add_argument("--out", required=True, help="where to write the fixture JSON files")
    ap.add_argument("--allow-jinja2-fallback", action="store_true",
                    help="without transformers, use an identical jinja2 environment")
    args = ap.parse_args()
    renderer = Renderer(args.allow_jinja2_fallback)
    print("renderer:", renderer.kind)
    # Smoke test: an API change in transformers must stop the run, not be recorded as template errors.
    smoke = renderer.render("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ strftime_now('%Y') }}",
                            [{"role": "user", "content": "x"}], None, True, "<s>", "</s>")
    assert smoke == "<s>x%d" % FIXED_NOW.year, smoke
    os.makedirs(args.out, exist_ok=True)
    total = errors = 0
    for fixture_name, entries in load_sources(args.templates):
        templates = []
        for e in entries:
            cases = []
            for conv_name, agp in CASES:
                conv = CONVERSATIONS[conv_name]
                case = {"conversation": conv_name, "add_generation_prompt": agp}
                try:
                    case["output"] = renderer.render(e["text"], json.loads(json.dumps(conv["messages"])),
                                                     conv.get("tools"), agp, e["bos"], e["eos"])
                except Exception as exc:  # the C++ side must fail too (same message for raise_exception)
                    case["error_type"] = type(exc).__name__
                    case["error"] = str(exc)
                    errors += 1
                cases.append(case)
                total += 1
            t = {"id": e["id"], "path": e["path"]}
            for k in ("index", "key", "name"):
                if k in e:
                    t[k] = e[k]
            t.update({"fnv1a64": fnv1a64(e["text"]), "bos_token": e["bos"], "eos_token": e["eos"], "cases": cases})
            templates.append(t)
        doc = {
            "generator": "tools/make_chat_template_fixtures.py",
            "renderer": renderer.kind,
            "now": FIXED_NOW.isoformat(),
            "conversations": CONVERSATIONS,
            "templates": templates,
        }
        with open(os.path.join(args.out, fixture_name + ".json"), "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)
            f.write("\n")
    print("rendered %d cases (%d raised) into %s" % (total, errors, args.out))


if __name__ == "__main__":
    sys.exit(main())
