"""The GEMV tuners' picks remembered across processes (`qsparse_hf.kernels.tuning`), checked on any machine: the
timing itself is replaced by a stand-in that records what it was asked to time."""

import json
import warnings

import pytest
import torch

pytest.importorskip("triton")

from qsparse_hf.kernels import ffn, gemv, tuning  # noqa: E402


class _Timer:
    """Stands in for `gemv._fastest`: records each timing asked for and picks the last candidate (the default
    when there is none)."""

    def __init__(self):
        self.asked = []

    def __call__(self, configs, default, run):
        self.asked.append(list(configs))
        return configs[-1] if configs else default


@pytest.fixture
def fresh_process(tmp_path, monkeypatch):
    """A tuning cache file of its own, tuning allowed on the CPU (with timings stood in for), and a way to start
    over as a new process would: nothing tuned in memory, the file read again."""
    path = tmp_path / "cache" / "gemv_tuning.json"
    monkeypatch.setenv("QSPARSE_TUNING_CACHE", str(path))
    monkeypatch.setattr(gemv, "_tunable", lambda x, tune=True: tune)
    monkeypatch.setattr(ffn, "_tunable", lambda x, tune=True: tune)
    timer = _Timer()
    monkeypatch.setattr(gemv, "_fastest", timer)
    monkeypatch.setattr(ffn, "_fastest", timer)
    monkeypatch.setattr(tuning, "_WARNED", set())

    def restart():
        monkeypatch.setattr(tuning, "_ENTRIES", None)
        monkeypatch.setattr(gemv, "_CHOSEN", {})
        monkeypatch.setattr(ffn, "_CONFIGS", {})

    restart()
    return path, timer, restart


def _shape(n_in=3584, n_out=4608, dtype=torch.bfloat16):
    return torch.zeros(1, n_in, dtype=dtype), torch.zeros(n_in, n_out, dtype=dtype)


def test_a_later_process_reads_the_picks_instead_of_timing(fresh_process):
    path, timer, restart = fresh_process
    x, weight_t = _shape()
    first = gemv.choose_config(x, weight_t, rows=1792)
    assert len(timer.asked) == 1 and first == timer.asked[0][-1]
    assert path.exists() and list(json.loads(path.read_text()).values()) == [list(first)]

    restart()
    again = gemv.choose_config(x, weight_t, rows=1792)
    assert again == first and isinstance(again, gemv.GemvConfig) and len(timer.asked) == 1

    # what the key holds apart is timed apart: listed rows or none, the tall tiles, the dtype, the shape
    gemv.choose_config(x, weight_t)
    gemv.choose_config(x, weight_t, rows=2048)
    gemv.choose_config(x.half(), weight_t.half(), rows=1792)
    gemv.choose_config(*_shape(n_out=3584), rows=1792)
    assert len(timer.asked) == 5
    restart()
    for args, kwargs in [((x, weight_t), {}), ((x, weight_t), {"rows": 2048}),
                         ((x.half(), weight_t.half()), {"rows": 1792})]:
        gemv.choose_config(*args, **kwargs)
    assert len(timer.asked) == 5 and len(json.loads(path.read_text())) == 5


def test_the_eager_single_launch_tuning_is_remembered_too(fresh_process):
    path, timer, restart = fresh_process
    x, weight_t = _shape()
    plain = gemv.choose_config(x, weight_t)
    single = gemv.choose_config(x, weight_t, tall=False)
    timed = len(timer.asked)  # the plain pick, and the single launch's unless the plain pick serves it
    assert timed in (1, 2) and (timed == 2) == (plain not in gemv._candidates(4608, 3584, tall=False))
    restart()
    assert gemv.choose_config(x, weight_t, tall=False) == single and gemv.choose_config(x, weight_t) == plain
    assert len(timer.asked) == timed


def test_the_gated_ffn_tuner_shares_the_file(fresh_process):
    path, timer, restart = fresh_process
    x, block = _shape(n_in=1024, n_out=2 * 4096)
    first = ffn.gated_config(x, block, 4096, rows=512)
    assert timer.asked[0] and first == timer.asked[0][-1]
    restart()
    assert ffn.gated_config(x, block, 4096, rows=512) == first and len(timer.asked) == 1
    assert any(key.startswith("gated | ") for key in json.loads(path.read_text()))


def test_another_gpu_or_other_kernels_tune_afresh(fresh_process, tmp_path, monkeypatch):
    path, timer, restart = fresh_process
    source = tmp_path / "kernel.py"
    source.write_text("version 1")
    monkeypatch.setattr(tuning, "_SOURCES", (str(source),))  # (an absolute path: read as it is)
    monkeypatch.setattr(tuning, "_FINGERPRINTS", {})
    x, weight_t = _shape()
    gemv.choose_config(x, weight_t, rows=1792)
    source.write_text("version 2")  # the kernels changed: their picks no longer hold
    monkeypatch.setattr(tuning, "_FINGERPRINTS", {})
    restart()
    gemv.choose_config(x, weight_t, rows=1792)
    assert len(timer.asked) == 2
    monkeypatch.setattr(tuning, "_FINGERPRINTS", {x.device: "another GPU"})
    restart()
    gemv.choose_config(x, weight_t, rows=1792)
    assert len(timer.asked) == 3 and len(json.loads(path.read_text())) == 3


def test_off_when_asked(fresh_process, monkeypatch):
    path, timer, restart = fresh_process
    monkeypatch.setenv("QSPARSE_TUNING_CACHE", "0")
    x, weight_t = _shape()
    gemv.choose_config(x, weight_t, rows=1792)
    restart()
    gemv.choose_config(x, weight_t, rows=1792)
    assert len(timer.asked) == 2 and not path.exists() and tuning.cache_path() is None


def test_a_broken_file_is_reported_once_and_replaced(fresh_process):
    path, timer, restart = fresh_process
    path.parent.mkdir(parents=True)
    path.write_text("{ not json")
    x, weight_t = _shape()
    with pytest.warns(UserWarning, match="could not read its GEMV tuning cache"):
        gemv.choose_config(x, weight_t, rows=1792)
    assert len(timer.asked) == 1 and len(json.loads(path.read_text())) == 1  # rewritten whole
    # entries that are not launch configurations are ignored, not used
    entries = json.loads(path.read_text())
    path.write_text(json.dumps({key: ["64", None] for key in entries}))
    restart()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gemv.choose_config(x, weight_t, rows=1792)
    assert len(timer.asked) == 2


def test_an_unwritable_cache_warns_once_and_tuning_goes_on(fresh_process, tmp_path, monkeypatch):
    path, timer, restart = fresh_process
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("QSPARSE_TUNING_CACHE", str(blocker / "gemv_tuning.json"))  # its folder is a file
    x, weight_t = _shape()
    with pytest.warns(UserWarning, match="could not (read|write) its GEMV tuning cache") as caught:
        first = gemv.choose_config(x, weight_t, rows=1792)
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        second = gemv.choose_config(x, weight_t, rows=2048)
    assert first == timer.asked[0][-1] and second == timer.asked[1][-1]
    assert not list(tmp_path.glob("**/*.tmp"))


class _FakeBench:
    """Stands in for `triton.testing.do_bench`: runs the launch once (which records its config) and answers the
    next of that config's scripted timings (ms); a config scripted as None is one the compiler rejects."""

    def __init__(self, script):
        self.script = {config: None if times is None else list(times) for config, times in script.items()}
        self.timed = []

    def __call__(self, fn, **_):
        fn()
        config = self.timed[-1]
        times = self.script[config]
        if times is None:
            raise RuntimeError("out of resources")
        return times.pop(0) if len(times) > 1 else times[0]


def _pick(monkeypatch, script, default=gemv.GemvConfig(1, 1, 1)):
    bench = _FakeBench(script)
    monkeypatch.setattr(gemv.triton.testing, "do_bench", bench)
    return gemv._fastest(list(script), default, bench.timed.append), bench.timed


def test_near_tied_launches_are_timed_again_and_the_rounds_decide(monkeypatch):
    a, b, c = gemv.GemvConfig(64, 128, 8, 4, 3), gemv.GemvConfig(64, 64, 8, 4, 3), gemv.GemvConfig(32, 64, 4, 4, 3)
    # a looks fastest once, but b is faster in every later round; c is far behind and not timed again
    best, timed = _pick(monkeypatch, {a: [1.00, 1.10, 1.10, 1.10], b: [1.03, 1.00, 1.00, 1.00], c: [2.0]})
    assert best == b
    assert timed.count(c) == 1 and timed.count(a) == timed.count(b) == 1 + gemv._RUNOFF_ROUNDS


def test_a_tie_goes_to_the_shallower_pipeline_and_rejected_launches_are_skipped(monkeypatch):
    deep, shallow, broken = (gemv.GemvConfig(64, 128, 8, 4, 3), gemv.GemvConfig(64, 128, 8, 4, 1),
                             gemv.GemvConfig(1024, 32, 16, 16, 3))
    best, _ = _pick(monkeypatch, {deep: [1.000], shallow: [1.005], broken: None})
    assert best == shallow
    # outside the tie margin the faster one wins, whatever its depth
    best, _ = _pick(monkeypatch, {deep: [1.00], shallow: [1.04]})
    assert best == deep
    default = gemv.GemvConfig(2, 2, 2)
    assert _pick(monkeypatch, {broken: None}, default)[0] == default
