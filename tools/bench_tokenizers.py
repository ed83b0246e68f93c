"""Single-thread encode throughput: BioQuant vs HF tokenizers on the same tokenizer files and corpus.

Run on a machine that has `tokenizers` (the GPU machine), with a BioQuant binary bundle:
  python3 tools/bench_tokenizers.py BUNDLE_DIR TOK_DIR CORPUS.jsonl
BUNDLE_DIR holds `bioquant` and `lib/` (its shared libraries and the glibc loader, so the binary runs
whatever the host's glibc); TOK_DIR holds the staged ../shared/tokenizers (tools/make_tokenizer_fixtures.py stage).
Both sides encode every corpus text one at a time, one thread, best of 5 passes.
"""
import json
import os
import subprocess
import sys
import time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tokenizers import Tokenizer, models, pre_tokenizers, decoders  # noqa: E402

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def hf_gpt2_files(d):
    vocab = json.load(open(os.path.join(d, "encoder.json")))
    merges = [tuple(line.split(" ", 1)) for line in open(os.path.join(d, "vocab.bpe"), encoding="utf-8").read().split("\n")
              if line and not line.startswith("#version")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=__import__("tokenizers").Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def time_hf(tok, texts):
    best = 1e30
    n = 0
    for _ in range(5):
        t0 = time.perf_counter()
        n = 0
        for t in texts:
            n += len(tok.encode(t, add_special_tokens=False).ids)
        best = min(best, time.perf_counter() - t0)
    return best, n


def time_bioquant(bundle, model, corpus):
    cmd = [os.path.join(bundle, "lib", "ld-linux-x86-64.so.2"), "--library-path", os.path.join(bundle, "lib"),
           os.path.join(bundle, "bioquant"), "tokenize", "--model", model, "--file", corpus, "--bench", "--no-special"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    j = json.loads(out)
    return j["seconds"], j["tokens"]


def main():
    bundle, tokdir, corpus = sys.argv[1:4]
    here = os.path.dirname(os.path.abspath(__file__))
    fx = os.path.join(here, "..", "tests", "fixtures", "tokenizers", "json")
    texts = [json.loads(line) for line in open(corpus, encoding="utf-8") if line.strip()]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    cases = [("llama3.2 BPE (128k, Llama 3 split)", hf_gpt2_files(os.path.join(tokdir, "tokenizers/llama3.2-gpt2format")),
              os.path.join(tokdir, "tokenizers/llama3.2-gpt2format"))]
    for name in ("bytelevel-llama3", "bytelevel-qwen2", "gpt2", "spm-metaspace", "spm-legacy"):
        p = os.path.join(fx, name, "tokenizer.json")
        cases.append((f"tokenizer.json {name}", Tokenizer.from_file(p), p))
    rows = []
    for name, hf, path in cases:
        hs, hn = time_hf(hf, texts)
        bs, bn = time_bioquant(bundle, path, corpus)
        rows.append({"tokenizer": name, "texts": len(texts), "mb": round(mb, 3), "hf_mb_s": round(mb / hs, 2),
                     "bioquant_mb_s": round(mb / bs, 2), "ratio": round(hs / bs, 2), "same_token_count": hn == bn})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
