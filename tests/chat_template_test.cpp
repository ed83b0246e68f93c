// Chat templates: the real templates in ../shared/tokenizers/chat_templates rendered exactly as
// transformers renders them (references in tests/fixtures/chat_templates, made by
// tools/make_chat_template_fixtures.py), plus engine unit tests checked against jinja2 3.1.
#include "bioquant/tokenizer/chat_template.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>

#include "bioquant/core/error.h"
#include "test_util.h"

namespace bioquant {
namespace {

using Json = nlohmann::ordered_json;

// The date the fixtures pinned strftime_now to (tools/make_chat_template_fixtures.py FIXED_NOW).
std::tm fixture_now() {
  std::tm tm{};
  tm.tm_year = 2025 - 1900;
  tm.tm_mon = 10;  // November
  tm.tm_mday = 27;
  tm.tm_hour = 9;
  tm.tm_min = 30;
  tm.tm_wday = 4;   // Thursday
  tm.tm_yday = 330;
  return tm;
}

std::string fnv1a64(const std::string& text) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : text) h = (h ^ c) * 0x100000001B3ull;
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// ---------------------------------------------------------------------------------------------------
// Real templates against transformers
// ---------------------------------------------------------------------------------------------------

struct Reference {
  std::string fixture;  // fixture file path
  size_t index;         // template entry in it
  std::string id;       // e.g. "llama.cpp-models/google-gemma-2-2b-it.jinja"
};

std::vector<Reference> references() {
  std::vector<Reference> refs;
  std::string dir = test::fixtures_dir() + "/chat_templates";
  if (!std::filesystem::is_directory(dir)) return refs;
  std::vector<std::string> files;
  for (auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().extension() == ".json") files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  for (auto& f : files) {
    Json doc = Json::parse(test::read_file(f));
    for (size_t i = 0; i < doc["templates"].size(); ++i) refs.push_back({f, i, doc["templates"][i]["id"]});
  }
  return refs;
}

std::string test_name(const testing::TestParamInfo<Reference>& info) {
  std::string name;
  for (char c : info.param.id) name += std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
  return name;
}

class RealTemplates : public testing::TestWithParam<Reference> {};

// The template text named by a fixture entry: a .jinja file, a key of a tokenizer_config.json,
// or entry `index` of ollama_template_index.json.
std::string template_text(const std::string& dir, const Json& entry) {
  std::string text = test::read_file(dir + "/" + entry["path"].get<std::string>());
  if (entry.contains("key")) return Json::parse(text)[entry["key"].get<std::string>()].get<std::string>();
  if (entry.contains("index")) return Json::parse(text)[entry["index"].get<size_t>()]["template"].get<std::string>();
  return text;
}

TEST_P(RealTemplates, RenderLikeTransformers) {
  const std::string shared = test::shared_dir();
  if (shared.empty()) GTEST_SKIP() << "../shared not present";
  const std::string dir = shared + "/tokenizers/chat_templates";
  Json doc = Json::parse(test::read_file(GetParam().fixture));
  const Json& entry = doc["templates"][GetParam().index];
  std::string text = template_text(dir, entry);
  ASSERT_EQ(fnv1a64(text), entry["fnv1a64"].get<std::string>())
      << entry["id"] << " changed in ../shared: regenerate with tools/make_chat_template_fixtures.py";

  ChatTemplate tpl(text);
  tpl.set_fixed_time(fixture_now());
  const std::string bos = entry["bos_token"], eos = entry["eos_token"];
  for (const Json& c : entry["cases"]) {
    const Json& conv = doc["conversations"][c["conversation"].get<std::string>()];
    const bool agp = c["add_generation_prompt"];
    SCOPED_TRACE(c["conversation"].get<std::string>() + (agp ? " +generation prompt" : ""));
    Json context = {{"messages", conv["messages"]},
                    {"tools", conv.contains("tools") ? conv["tools"] : Json(nullptr)},
                    {"documents", nullptr},
                    {"add_generation_prompt", agp},
                    {"bos_token", bos},
                    {"eos_token", eos}};
    if (c.contains("output")) {
      try {
        EXPECT_EQ(tpl.render(context), c["output"].get<std::string>());
      } catch (const Error& e) {
        ADD_FAILURE() << "threw: " << e.what();
      }
      // Plain role/content conversations also through the ChatMessage API (same variables).
      bool plain = !conv.contains("tools") && std::all_of(conv["messages"].begin(), conv["messages"].end(), [](const Json& m) {
        return m.size() == 2 && m["content"].is_string();
      });
      if (plain) {
        std::vector<ChatMessage> messages;
        for (const Json& m : conv["messages"]) messages.push_back({m["role"], m["content"]});
        EXPECT_EQ(tpl.render(messages, agp, bos, eos), c["output"].get<std::string>());
      }
    } else {
      // transformers raised: raise_exception(msg) (TemplateError) must give msg; other errors
      // (TypeError on str + list, ...) only have to be errors.
      try {
        std::string out = tpl.render(context);
        ADD_FAILURE() << "expected " << c["error_type"] << " '" << c["error"] << "', rendered: " << out;
      } catch (const Error& e) {
        if (c["error_type"] == "TemplateError") {
          EXPECT_EQ(std::string(e.what()), c["error"].get<std::string>());
        }
        EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(ChatTemplate, RealTemplates, testing::ValuesIn(references()), test_name);

TEST(ChatTemplateFixtures, CoverEverySharedTemplate) {
  const std::string shared = test::shared_dir();
  if (shared.empty()) GTEST_SKIP() << "../shared not present";
  std::vector<std::string> ids;
  for (auto& r : references()) ids.push_back(r.id);
  const std::string dir = shared + "/tokenizers/chat_templates";
  for (auto& e : std::filesystem::directory_iterator(dir + "/llama.cpp-models"))
    EXPECT_NE(std::find(ids.begin(), ids.end(), "llama.cpp-models/" + e.path().filename().string()), ids.end())
        << e.path();
  for (const char* f : {"mistral-common_v1_spm.jinja", "mistral-common_v3_spm.jinja",
                        "llama-3-8b-instruct.tokenizer_config.json#chat_template"})
    EXPECT_NE(std::find(ids.begin(), ids.end(), f), ids.end()) << f;
  size_t n = Json::parse(test::read_file(dir + "/ollama_template_index.json")).size();
  for (size_t i = 0; i < n; ++i) {
    std::string id = "ollama_template_index.json#" + std::to_string(i);
    EXPECT_NE(std::find(ids.begin(), ids.end(), id), ids.end()) << id;
  }
}


// ---------------------------------------------------------------------------------------------------
// Engine semantics (expected strings are jinja2 3.1's output in transformers' environment)
// ---------------------------------------------------------------------------------------------------

const Json& engine_context() {
  static const Json ctx = Json::parse(R"({
    "messages": [{"role": "system", "content": " sys "}, {"role": "user", "content": "hi µ"},
                 {"role": "assistant", "content": "yo"}],
    "d": {"b": 2, "a": 1}, "n": null, "s": "  Hello World  ", "l": [3, 1, 2], "e": "", "u8": "héllo wörld ✓"})");
  return ctx;
}

struct EngineCase {
  const char* what;
  const char* source;
  const char* expected;
};

const EngineCase kEngineCases[] = {
    {"trim_blocks removes the newline after a block tag",
     "{% if true %}\nyes\n{% endif %}\nend",
     "yes\nend"},
    {"lstrip_blocks removes indentation before a block tag",
     "<\n    {% if true %}\n    x\n    {% endif %}\n>",
     "<\n    x\n>"},
    {"'-' strips all whitespace on its side",
     "a  \n {%- if true -%} \n  b  \n {%- endif -%}\n  c",
     "abc"},
    {"'+' disables lstrip_blocks and trim_blocks",
     "  {%+ if true +%}\nx{% endif %}",
     "  \nx"},
    {"variable tags are not trimmed",
     "  {{ 'v' }}\n{{ 'w' -}}\n  x",
     "  v\nwx"},
    {"comments trim like blocks",
     "a\n  {# note #}\nb {#- c -#} c",
     "a\nbc"},
    {"a trailing newline of the template is dropped",
     "x\n",
     "x"},
    {"raw blocks",
     "{% raw %}{{ not parsed }}{% endraw %}",
     "{{ not parsed }}"},
    {"python str() of values",
     "{{ 1.0 }} {{ 1e16 }} {{ 1e-05 }} {{ 0.1 + 0.2 }} {{ true }} {{ none }} {{ [1, 'a', none, false] }} {{ {'k': 'v'} }} {{ 7 / 2 }} {{ 6 / 2 }}",
     "1.0 1e+16 1e-05 0.30000000000000004 True None [1, 'a', None, False] {'k': 'v'} 3.5 3.0"},
    {"undefined prints empty, is falsy",
     "[{{ missing }}][{{ d.missing }}]{{ missing is defined }}{{ not d.missing }}",
     "[][]FalseTrue"},
    {"integer arithmetic follows python",
     "{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ 2 ** 3 ** 2 }} {{ -2 ** 2 }} {{ 1 + 2 * 3 }} {{ 'ab' * 2 }} {{ [1] + [2] }}",
     "3 -4 2 1024 64 4 7 abab [1, 2]"},
    {"~ concatenates str() of anything",
     "{{ 'n=' ~ 1 ~ none ~ missing ~ 2.0 ~ true }}",
     "n=1None2.0True"},
    {"comparisons, chained, in",
     "{{ 1 == 1.0 }} {{ true == 1 }} {{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 'b' in 'abc' }} {{ 'x' not in l }} {{ 'a' in d }} {{ 'a' != false }}",
     "True True True False True True True True"},
    {"and/or return operands",
     "{{ '' or 'fallback' }}|{{ 'v' and 0 }}|{{ none or e or 'z' }}",
     "fallback|0|z"},
    {"inline if, with and without else",
     "{{ 'a' if true else 'b' }}|{{ 'a' if false }}|{{ 'x' if false else 'y' if false else 'z' }}",
     "a||z"},
    {"string escapes in literals",
     "{{ 'a\\nb\\t\\x41\\u00b5\\101\\q' }}|{{ \"it's\" }}|{{ 'say \"hi\"' }}|{{ 'a' 'b' }}",
     "a\nb\tAµA\\q|it's|say \"hi\"|ab"},
    {"subscripts, negative indices, slices by code point",
     "{{ l[0] }} {{ l[-1] }} {{ l[1:] }} {{ l[::-1] }} {{ l[::2] }} {{ u8[1:4] }} {{ u8[-1] }} {{ messages.0.role }} {{ messages[0]['role'] }}",
     "3 2 [1, 2] [2, 1, 3] [3, 2] éll ✓ system system"},
    {"missing index or key is undefined",
     "[{{ l[10] }}][{{ d['zz'] }}][{{ n.x }}]",
     "[][][]"},
    {"for: loop variables",
     "{% for x in l %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.first }}{{ loop.last }}{{ loop.length }};{% endfor %}",
     "103TrueFalse3;212FalseFalse3;321FalseTrue3;"},
    {"for: if filter counts only kept items",
     "{% for m in messages if m.role != 'system' %}{{ m.role }}{{ loop.index }}/{{ loop.length }} {% endfor %}",
     "user1/2 assistant2/2 "},
    {"for: else on empty",
     "{% for x in [] %}x{% else %}empty{% endfor %}",
     "empty"},
    {"for: tuple unpacking over items()",
     "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for k, v in d|items %}{{ k }}{{ v }}{% endfor %}",
     "b=2;a=1;b2a1"},
    {"for: break and continue",
     "{% for i in range(10) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 4 %}{% break %}{% endif %}{{ i }}{% endfor %}",
     "023"},
    {"for: previtem, nextitem, cycle",
     "{% for i in l %}{{ loop.previtem }}-{{ loop.nextitem }}-{{ loop.cycle('a', 'b') }};{% endfor %}",
     "-1-a;3-2-b;1--a;"},
    {"set inside a loop does not leak; namespace does",
     "{% set x = 1 %}{% set ns = namespace(x=1) %}{% for i in l %}{% set x = x + i %}{% set ns.x = ns.x + i %}{% endfor %}{{ x }} {{ ns.x }}",
     "1 7"},
    {"set: tuple assignment and block set with filters",
     "{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set t | trim | upper %}  body {{ a }}  {% endset %}[{{ t }}]",
     "12[BODY 1]"},
    {"macros: defaults, keywords, recursion, closure",
     "{% set sep = '/' %}{% macro m(a, b='B') %}{{ a }}{{ sep }}{{ b }}{% endmacro %}{{ m(1) }} {{ m(b=2, a=3) }}{% macro r(n) %}{% if n > 0 %}{{ n }}{{ r(n - 1) }}{% endif %}{% endmacro %} {{ r(3) }}",
     "1/B 3/2 321"},
    {"filter blocks",
     "{% filter upper %}abc {{ s|trim }}{% endfilter %}",
     "ABC HELLO WORLD"},
    {"string filters",
     "{{ s|trim }}|{{ s|upper }}|{{ s|lower }}|{{ 'hello wORLD-x (y'|title }}|{{ 'hELLO'|capitalize }}|{{ 'µ-α ß'|upper }}|{{ 'Hello'|replace('l', 'L') }}",
     "Hello World|  HELLO WORLD  |  hello world  |Hello World-X (Y|Hello|Μ-Α SS|HeLLo"},
    {"default filter",
     "{{ missing|default('d') }} {{ e|default('d') }} {{ e|default('d', true) }} {{ e|d('z', boolean=true) }} {{ n|default(1) }}",
     "d  d z None"},
    {"sequence filters",
     "{{ l|first }} {{ l|last }} {{ l|length }} {{ 'µµ'|length }} {{ l|join(', ') }} {{ l|reverse|list }} {{ l|sort }} {{ l|sum }} {{ l|max }} {{ l|min }} {{ [1, 2, 1]|unique|list }} {{ 'ab'|list }}",
     "3 2 3 2 3, 1, 2 [2, 1, 3] [1, 2, 3] 6 3 1 [1, 2] ['a', 'b']"},
    {"select/reject/selectattr/rejectattr/map",
     "{{ l|select('odd')|list }} {{ l|reject('odd')|list }} {{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|list }} {{ messages|rejectattr('role', 'in', ['user'])|map(attribute='role')|join(',') }} {{ ['a', 'b']|map('upper')|list }}",
     "[3, 1] [2] ['hi µ'] system,assistant ['A', 'B']"},
    {"number filters",
     "{{ '22.5'|int }} {{ ' 42 '|int }} {{ 'x'|int }} {{ 'x'|int(7) }} {{ 3|float }} {{ '1e3'|float }} {{ 2.5|round }} {{ 3.5|round }} {{ 2.675|round(2) }} {{ 2.1|round(0, 'ceil') }} {{ -3|abs }} {{ 22.5|string }}",
     "22 42 0 7 3.0 1000.0 2.0 4.0 2.67 3.0 3 22.5"},
    {"tojson like json.dumps(ensure_ascii=False)",
     "{{ {'b': [1, 2.5, none, true, 'q\"µ\\n'], 'a': {}}|tojson }}|{{ d|tojson(indent=2) }}|{{ d|tojson(sort_keys=true) }}|{{ 'µ'|tojson(ensure_ascii=true) }}|{{ d|tojson(separators=(',', ':')) }}",
     "{\"b\": [1, 2.5, null, true, \"q\\\"µ\\n\"], \"a\": {}}|{\n  \"b\": 2,\n  \"a\": 1\n}|{\"a\": 1, \"b\": 2}|\"\\u00b5\"|{\"b\":2,\"a\":1}"},
    {"indent filter",
     "{{ 'a\\nb\\n\\nc\\n'|indent }}|{{ 'a\\nb'|indent(2, true) }}|{{ 'a\\n\\nb'|indent(2, blank=true) }}",
     "a\n    b\n\n    c\n|  a\n  b|a\n  \n  b"},
    {"markup: str + safe escapes the str, as markupsafe does",
     "{% set j = d|tojson|safe %}{{ '{\"x\": ' + j + '}' }}|{{ 'a<' ~ ('b'|safe) }}",
     "{&#34;x&#34;: {\"b\": 2, \"a\": 1}}|a<b"},
    {"tests",
     "{{ 7 is odd }} {{ 7 is divisibleby 7 }} {{ s is string }} {{ l is sequence }} {{ d is mapping }} {{ missing is iterable }} {{ n is iterable }} {{ true is number }} {{ true is integer }} {{ 1.5 is float }} {{ n is none }} {{ 3 is in l }} {{ 3 is gt 2 }} {{ missing is undefined }}",
     "True True True True True True False True False True True True True True"},
    {"string methods",
     "{{ s.strip() }}|{{ 'xxaxx'.strip('x') }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ 'a b  c'.split() }} {{ 'a,b'.split(',') }} {{ ' a  b '.split(none, 1) }} {{ 'a b c'.rsplit(' ', 1) }} {{ s.startswith('  He') }} {{ 'abc'.endswith(('x', 'c')) }} {{ \"it's\".title() }} {{ 'aaa'.replace('a', 'b', 2) }} {{ '-'.join(['a', 'b']) }} {{ 'abcabc'.find('c') }}",
     "Hello World|a|Hello World  |  Hello World|['a', 'b', 'c'] ['a', 'b'] ['a', 'b '] ['a b', 'c'] True True It'S bba a-b 2"},
    {"dict methods",
     "{{ d.get('a') }} {{ d.get('x') }} {{ d.get('x', 5) }} {{ d.keys()|list }} {{ d.values()|list }} {{ d.items() is defined }}",
     "1 None 5 ['b', 'a'] [2, 1] True"},
    {"globals: range, dict, namespace",
     "{{ range(3)|list }} {{ range(1, 10, 3)|list }} {{ dict(a=1, b='x') }} {{ namespace(a=1).a }}",
     "[0, 1, 2] [1, 4, 7] {'a': 1, 'b': 'x'} 1"},
};

TEST(ChatTemplateEngine, MatchesJinja2) {
  for (const EngineCase& c : kEngineCases) {
    SCOPED_TRACE(c.what);
    try {
      EXPECT_EQ(ChatTemplate(c.source).render(engine_context()), c.expected) << c.source;
    } catch (const Error& e) {
      ADD_FAILURE() << c.source << " threw: " << e.what();
    }
  }
}

TEST(ChatTemplateEngine, StrftimeNowUsesFixedTimeOrClock) {
  ChatTemplate tpl("{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%Y-%m-%dT%H:%M') }}");
  tpl.set_fixed_time(fixture_now());
  EXPECT_EQ(tpl.render(Json::object()), "27 Nov 2025|2025-11-27T09:30");
  tpl.set_fixed_time(std::nullopt);
  std::time_t now = std::time(nullptr);
  std::tm local{};
  localtime_r(&now, &local);
  EXPECT_NE(tpl.render(Json::object()).find(std::to_string(1900 + local.tm_year)), std::string::npos);
}

TEST(ChatTemplateEngine, ChatMessageApiPassesTransformersVariables) {
  ChatTemplate tpl(
      "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}{% endfor %}"
      "{% if add_generation_prompt %}<assistant>{% endif %}{{ eos_token }}"
      "|{{ tools is none }}{{ documents is none }}{{ extra_var | default('-') }}");
  std::vector<ChatMessage> messages = {{"system", " be brief "}, {"user", "hi\n"}};
  EXPECT_EQ(tpl.render(messages, true, "<s>", "</s>"), "<s><system>be brief<user>hi<assistant></s>|TrueTrue-");
  EXPECT_EQ(tpl.render(messages, false, "", "", Json{{"extra_var", 5}, {"tools", Json::array()}}),
            "<system>be brief<user>hi|FalseTrue5");
  ChatTemplate copy = tpl;  // copies share the parsed program
  EXPECT_EQ(copy.render(messages, true, "<s>", "</s>"), tpl.render(messages, true, "<s>", "</s>"));
}

TEST(ChatTemplateEngine, RaiseExceptionGivesTheMessage) {
  ChatTemplate tpl("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok");
  EXPECT_EQ(tpl.render({{"user", "x"}}, false, "", ""), "ok");
  try {
    tpl.render({{"system", "x"}}, false, "", "");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "System role not supported");
  }
}

// One-line bioquant::Error for every malformed template; never a crash or a hang.
TEST(ChatTemplateEngine, MalformedTemplatesThrowOneLineErrors) {
  const char* bad[] = {
      "{{ 'unclosed",           "{{ x",                      "{% if true %}no end",       "{% for x in l %}",
      "{% endfor %}",           "{% if %}{% endif %}",       "{{ x | nosuchfilter }}",    "{{ x is nosuchtest }}",
      "{% nosuchtag %}",        "{{ (1, 2 }}",               "{{ [1, 2) }}",              "{{ 1 ) }}",
      "{# unclosed comment",    "{{ }}",                     "{% set %}",                 "{% for in l %}{% endfor %}",
      "{{ a.b. }}",             "{{ 1 2 }}",                 "{{ 1 + }}",                 "{% if true %}{% elif %}{% endif %}",
      "{{ x is is defined }}",  "{% include 'x' %}",         "{% extends 'x' %}",         "{{ f(a=1, 2) }}",
      "{{ '\\xZZ' }}",          "{{ 007 }}",                 "{% raw %}never closed",     "{% macro m( %}{% endmacro %}",
      "{{ 99999999999999999999 }}", "{% for x in l recursive %}{% endfor %}", "{{ ! }}",      "{%",
  };
  std::vector<std::string> sources(std::begin(bad), std::end(bad));
  sources.push_back("{{ " + std::string(100000, '(') + "1" + std::string(100000, ')') + " }}");  // no stack overflow
  sources.push_back(std::string(50000, '{') + std::string(50000, '%'));
  for (int i = 0; i < 3000; ++i) sources.back() += "{% if true %}";
  for (const std::string& source : sources) {
    SCOPED_TRACE(source.substr(0, 60));
    try {
      ChatTemplate tpl(source);
      FAIL() << "parsed without error";
    } catch (const Error& e) {
      std::string what = e.what();
      EXPECT_NE(what.find("chat template syntax error"), std::string::npos) << what;
      EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    }
  }
}

TEST(ChatTemplateEngine, RuntimeErrorsThrowOneLineErrors) {
  const char* bad[] = {
      "{{ missing.attr }}",                    // attribute of undefined
      "{{ d.missing.attr }}",                  // jinja2: 'dict object' has no attribute 'missing'
      "{{ 'a' + 1 }}",                         // TypeError
      "{{ messages[0].content + none }}",      // TypeError
      "{{ 1 / 0 }}",                           // ZeroDivisionError
      "{{ 1 < 'a' }}",                         // unorderable
      "{% for x in 5 %}{% endfor %}",          // not iterable
      "{% for a, b in [[1, 2, 3]] %}{% endfor %}",  // unpacking
      "{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}",  // unbounded recursion
      "{{ 'x' * 1000000 * 1000 }}",            // output guard
      "{{ range(1000000)|length }}",           // sandbox range limit
      "{{ l.append(4) }}",                     // immutable sandbox
      "{{ missing|tojson }}",                  // Undefined is not JSON serializable
      "{% set q = 5 %}{% set q.x = 1 %}",      // not a namespace
      "{% break %}",                           // outside a loop
      "{{ 2 ** 64 }}",                         // beyond 64-bit integers
  };
  for (const char* source : bad) {
    SCOPED_TRACE(source);
    ChatTemplate tpl(source);
    try {
      std::string out = tpl.render(engine_context());
      ADD_FAILURE() << "rendered: " << out.substr(0, 80);
    } catch (const Error& e) {
      std::string what = e.what();
      EXPECT_NE(what.find("chat template error"), std::string::npos) << what;
      EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    }
  }
  EXPECT_THROW(ChatTemplate("x").render(Json::array()), Error);  // the context must be an object
}

}  // namespace
}  // namespace bioquant
