"""Hostile or damaged files: every file longctx reads is checked (size, nesting, integers, types, shapes against the
config) and refused with one line that names it, before anything large is allocated."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_cli import TINY, Result, assert_user_error, run_inprocess

import longctx.checkpoint as checkpoint_module
from longctx.checkpoint import find_checkpoints, load_checkpoint
from longctx.data import bundled_documents
from longctx.errors import CheckpointError
from longctx.validate import MAX_JSON_BYTES

DEEP = "[" * 10_000 + "]" * 10_000
HUGE = "1" + "0" * 4_999  # 5,000 digits


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with a 2-step checkpoint (runs/ck/step-00000002) and a state saved after a short prompt."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "data").mkdir()
    for doc in bundled_documents()[:3]:
        with doc.open() as f:
            (root / "data" / doc.name.split("/")[-1]).write_bytes(f.read()[:6000])
    res = run_inprocess(root, "train", "--data", "data", *TINY, "--max-steps", "2", "--out-dir", "runs/ck")
    assert res.code == 0, res.err
    res = run_inprocess(
        root, "generate", "--model", "runs/ck", "--prompt", "Hello", "-n", "0", "--save-state", "state.safetensors"
    )
    assert res.code == 0, res.err
    return root


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    data = edit(data) or data
    path.write_text(json.dumps(data))


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)


def _set_meta(path: Path, key: str, value: str) -> None:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**metadata, key: value})


def _info(c: Path, _: Path) -> list:
    return ["info", c]


def _resume(c: Path, _: Path) -> list:
    return ["train", "--resume", c, "--max-steps", "3", "--threads", "1", "--no-progress", "-q"]


def _generate(c: Path, s: Path) -> list:
    return ["generate", "--model", c, "--load-state", s, "--prompt", "", "-n", "1", "-q"]


def _print_config(*args: str) -> Callable[[Path, Path], list]:
    return lambda c, s: ["train", *args, "--print-config"]


def _preset(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda root: (root / name).write_bytes(content)


def _lane_keys_narrower(t: dict[str, torch.Tensor]) -> None:
    t["lane_state.keys"] = t["lane_state.keys"][..., :8].contiguous()


# case -> (damage(checkpoint folder, state file, workspace), command(checkpoint, state), fragments of the error)
Damage = Callable[[Path, Path, Path], object]
CASES: dict[str, tuple[Damage, Callable[[Path, Path], list], tuple[str, ...]]] = {
    "config.json nested 10,000 deep": (
        lambda c, s, r: (c / "config.json").write_text(DEEP),
        _info,
        ("config.json", "levels deep"),
    ),
    "config.json with a 5,000-digit integer": (
        lambda c, s, r: (c / "config.json").write_text('{"model": {"n_layer": ' + HUGE + "}}"),
        _info,
        ("config.json", "5,000 digits"),
    ),
    "config.json with n_layer 10**9": (
        lambda c, s, r: _edit_json(c / "config.json", lambda d: d["model"].update(n_layer=10**9)),
        _info,
        ("config.json", "model.n_layer", "<= 10,000"),
    ),
    "config.json with a huge d_model": (
        lambda c, s, r: _edit_json(c / "config.json", lambda d: d["model"].update(d_model=2**20)),
        _info,
        ("model.safetensors", "config.json implies"),
    ),
    "trainer_state.json nested 10,000 deep": (
        lambda c, s, r: (c / "trainer_state.json").write_text('{"step": ' + DEEP + "}"),
        _resume,
        ("trainer_state.json", "levels deep"),
    ),
    "trainer_state.json a top-level list": (
        lambda c, s, r: (c / "trainer_state.json").write_text("[1, 2]"),
        _resume,
        ("trainer_state.json", "JSON object"),
    ),
    "trainer_state.json without param_groups": (
        lambda c, s, r: _edit_json(c / "trainer_state.json", lambda d: d.pop("param_groups") and None),
        _resume,
        ("trainer_state.json", "param_groups"),
    ),
    "trainer_state.json with step 'abc'": (
        lambda c, s, r: _edit_json(c / "trainer_state.json", lambda d: d.update(step="abc")),
        _resume,
        ("trainer_state.json", "step must be an integer"),
    ),
    "trainer_state.json with a string learning rate": (
        lambda c, s, r: _edit_json(c / "trainer_state.json", lambda d: d["param_groups"][0].update(lr="fast")),
        _resume,
        ("trainer_state.json", "lr must be a number"),
    ),
    "optimizer moment of the wrong shape": (
        lambda c, s, r: _edit_tensors(
            c / "trainer_state.safetensors", lambda t: t.update({"optimizer.0.exp_avg": torch.zeros(3, 3)})
        ),
        _resume,
        ("trainer_state.safetensors", "optimizer.0.exp_avg", "(3, 3)"),
    ),
    "optimizer moment holding NaN": (
        lambda c, s, r: _edit_tensors(
            c / "trainer_state.safetensors", lambda t: t["optimizer.0.exp_avg_sq"].fill_(float("nan"))
        ),
        _resume,
        ("trainer_state.safetensors", "optimizer.0.exp_avg_sq", "NaN"),
    ),
    "lane state of the wrong shape": (
        lambda c, s, r: _edit_tensors(c / "trainer_state.safetensors", _lane_keys_narrower),
        _resume,
        ("trainer_state.safetensors", "lane_state.keys"),
    ),
    "bad RNG tensor": (
        lambda c, s, r: _edit_tensors(
            c / "trainer_state.safetensors", lambda t: t.update({"rng.torch.0": torch.zeros(10)})
        ),
        _resume,
        ("trainer_state.safetensors", "rng.torch.0"),
    ),
    "--load-state with a batch of 2": (
        lambda c, s, r: _edit_tensors(s, lambda t: t.update({k: torch.cat([v, v]) for k, v in t.items()})),
        _generate,
        ("state.safetensors", "one stream"),
    ),
    "--load-state holding NaN": (
        lambda c, s, r: _edit_tensors(s, lambda t: t["keys"].fill_(float("nan"))),
        _generate,
        ("state.safetensors", "NaN"),
    ),
    "--load-state holding inf": (
        lambda c, s, r: _edit_tensors(s, lambda t: t["values"].fill_(float("inf"))),
        _generate,
        ("state.safetensors", "inf"),
    ),
    "--load-state with a last token beyond the vocabulary": (
        lambda c, s, r: _set_meta(s, "last_token", "99999"),
        _generate,
        ("state.safetensors", "last_token"),
    ),
    "tokenizer.json with a token id beyond the vocabulary": (
        lambda c, s, r: _edit_json(c / "tokenizer.json", lambda d: d["model"]["vocab"].update(A=100_000)),
        _info,
        ("tokenizer.json", "token id 100000"),
    ),
    "tokenizer.json with a Split regex": (
        lambda c, s, r: _edit_json(
            c / "tokenizer.json",
            lambda d: d.update(
                pre_tokenizer={"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
            ),
        ),
        _info,
        ("tokenizer.json", "'Split'"),
    ),
    "tokenizer.json nested 10,000 deep": (
        lambda c, s, r: (c / "tokenizer.json").write_text(DEEP),
        _info,
        ("tokenizer.json", "levels deep"),
    ),
    "tokenizer.json larger than the limit (sparse)": (
        lambda c, s, r: open(c / "tokenizer.json", "r+b").truncate(MAX_JSON_BYTES + 1),
        _info,
        ("tokenizer.json", f"more than the {MAX_JSON_BYTES:,}"),
    ),
    "preset TOML nested 10,000 deep": (
        lambda c, s, r: _preset("p.toml", b"x = " + DEEP.encode())(r),
        _print_config("--preset", "p.toml"),
        ("p.toml", "levels deep"),
    ),
    "preset TOML with a 5,000-digit integer": (
        lambda c, s, r: _preset("p.toml", b"[model]\nn_layer = " + HUGE.encode())(r),
        _print_config("--preset", "p.toml"),
        ("p.toml", "64 bits"),
    ),
    "preset TOML with non-UTF-8 bytes": (
        lambda c, s, r: _preset("p.toml", b"[model]\nn_layer = 1 # \xff\xfe\n")(r),
        _print_config("--preset", "p.toml"),
        ("p.toml", "UTF-8"),
    ),
    "preset JSON nested 10,000 deep": (
        lambda c, s, r: _preset("p.json", DEEP.encode())(r),
        _print_config("--preset", "p.json"),
        ("p.json", "levels deep"),
    ),
    "--set nested 10,000 deep": (
        lambda c, s, r: None,
        _print_config("--set", f"model.infinite.sigmas={DEEP}"),
        ("--set", "levels deep"),
    ),
    "--set with a 5,000-digit integer": (
        lambda c, s, r: None,
        _print_config("--set", f"model.n_layer={HUGE}"),
        ("--set", "64 bits"),
    ),
    "--set with a 22-digit integer": (
        lambda c, s, r: None,
        _print_config("--set", f"model.n_layer={2**70}"),
        ("--set", "64 bits"),
    ),
    "--set with non-UTF-8 bytes": (
        lambda c, s, r: None,  # argv bytes that are not UTF-8 arrive as lone surrogates
        _print_config("--set", "mod\udcffel.n_layer=1"),
        ("--set", "UTF-8"),
    ),
    "--set with a window of 10**15 (train)": (
        lambda c, s, r: None,
        lambda c, s: [
            "train",
            "--data",
            "data",
            *TINY,
            "--set",
            f"model.transformer.window={10**15}",
            "--max-steps",
            "1",
            "--out-dir",
            c.parent / "new",
            "-q",
        ],
        ("the config", "bytes of buffers and state"),
    ),
    "metrics.jsonl nested 10,000 deep (plot)": (
        lambda c, s, r: (c.parent / "metrics.jsonl").write_text(DEEP + "\n"),
        lambda c, s: ["plot", c.parent, "-o", c.parent / "loss.png"],
        ("metrics.jsonl:1", "levels deep"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_file_is_one_line(root: Path, tmp_path: Path, case: str) -> None:
    damage, command, fragments = CASES[case]
    ckpt, state = tmp_path / "run" / "step-00000002", tmp_path / "state.safetensors"
    shutil.copytree(root / "runs" / "ck" / "step-00000002", ckpt)
    shutil.copy(root / "state.safetensors", state)
    damage(ckpt, state, root)
    res = run_inprocess(root, *command(ckpt, state))
    line = assert_user_error(res, *fragments)
    line.encode("utf-8")  # a real process writes stderr as UTF-8: a lone surrogate would be a traceback there
    for name in ("p.toml", "p.json"):
        (root / name).unlink(missing_ok=True)


def test_the_undamaged_copies_work(root: Path, tmp_path: Path) -> None:
    """The commands of the cases above succeed on undamaged files, so each refusal is the damage's doing."""
    ckpt, state = tmp_path / "run" / "step-00000002", tmp_path / "state.safetensors"
    shutil.copytree(root / "runs" / "ck" / "step-00000002", ckpt)
    shutil.copy(root / "state.safetensors", state)
    for command in (_info, _generate, _resume):
        res: Result = run_inprocess(root, *command(ckpt, state))
        assert res.code == 0, res.err
    assert find_checkpoints(tmp_path / "run")[-1].name == "step-00000003"


def test_overwrite_removes_a_symlink_not_its_target(root: Path, tmp_path: Path) -> None:
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "thesis.txt").write_text("years of work")
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(keep, target_is_directory=True)
    res = run_inprocess(root, "train", "--data", "data", *TINY, "--max-steps", "1", "--out-dir", out, "--overwrite")
    assert res.code == 0, res.err
    assert (keep / "thesis.txt").read_text() == "years of work" and not (out / "link").exists()


# --------------------------------------------------------------------------------------------------------------------
# bounded memory: the config is checked against the weights' header before anything is allocated


@pytest.mark.parametrize(
    "model", [{"n_layer": 9_000}, {"d_model": 2**20}, {"d_ff": 2**28}, {"transformer": {"window": 2**34}}], ids=str
)
def test_a_hostile_config_is_refused_before_the_model_is_built(
    root: Path, tmp_path: Path, monkeypatch, model: dict
) -> None:
    ckpt = tmp_path / "step-00000002"
    shutil.copytree(root / "runs" / "ck" / "step-00000002", ckpt)

    def merge(d: dict) -> None:
        for key, value in model.items():
            d["model"][key] = {**d["model"][key], **value} if isinstance(value, dict) else value

    _edit_json(ckpt / "config.json", merge)
    real = checkpoint_module.build_model

    def shapes_only(cfg):  # a model built for real before the checks would allocate what the config asks for
        assert torch.get_default_device().type == "meta", "a model was built before the config was checked"
        return real(cfg)

    monkeypatch.setattr(checkpoint_module, "build_model", shapes_only)
    with pytest.raises(CheckpointError, match="config.json|model.safetensors"):
        load_checkpoint(ckpt)


# --------------------------------------------------------------------------------------------------------------------
# bounded memory: BPE on text without whitespace

RSS_PROBE = """
import io, re, sys
from longctx.tokenizer import Tokenizer

def peak_mb():  # VmHWM: the process's peak RSS, which sees the tokenizer's Rust allocations (tracemalloc does not)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

words = "".join(chr(97 + (i * 7919) % 26) * (1 + i % 5) + ",.;"[i % 3] for i in range(4000))
tok = Tokenizer.train_bpe([" ".join(words.split(","))] * 4, 400)
data = (words * (2**20 // len(words) + 1)).encode()[: 2**20]  # 1 MB without whitespace
before = peak_mb()
n = sum(len(ids) for ids, _ in tok.iter_encode(io.BytesIO(data)))
print(n, peak_mb() - before)
"""


def test_bpe_memory_on_text_without_whitespace_is_bounded() -> None:
    """1 MB without whitespace raised the peak RSS by ~270 MB in one encoder call; in pieces of MAX_RUN_CHARS by
    ~22 MB."""
    import os
    import subprocess
    import sys

    import longctx

    env = {**os.environ, "PYTHONPATH": str(Path(longctx.__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", RSS_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    tokens, grown_mb = out.stdout.split()
    assert int(tokens) > 0 and float(grown_mb) < 64, out.stdout


def test_bpe_cuts_a_long_run_without_losing_bytes() -> None:
    from longctx.tokenizer import MAX_RUN_CHARS, Tokenizer

    tok = Tokenizer.train_bpe(["the cat sat on the mat, é ü"] * 20, 300)
    text = "ab" + "é" * MAX_RUN_CHARS + "cat" * 5 + " the mat"  # one run of 2 x MAX_RUN_CHARS + 15 bytes
    ids = tok.encode_text(text)
    assert tok.decode(ids.tolist()) == text


def test_a_trainer_state_claiming_huge_tensors_is_refused_before_it_is_read(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sparse trainer_state.safetensors whose header claims a 1 GiB optimizer moment: refused by its header, and
    the tensors are never read (reading them would allocate what the header claims)."""
    import struct

    import longctx.checkpoint as checkpoint

    ckpt = tmp_path / "run" / "step-00000002"
    shutil.copytree(root / "runs" / "ck" / "step-00000002", ckpt)
    n = 1 << 28  # float32 values: 1 GiB
    header = json.dumps({"optimizer.0.exp_avg": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    with open(ckpt / "trainer_state.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n)  # sparse: no disk used
    real_read = checkpoint._read_weights

    def read_weights(file: Path) -> object:
        assert file.name != "trainer_state.safetensors", "the trainer state was read before its header was checked"
        return real_read(file)

    monkeypatch.setattr(checkpoint, "_read_weights", read_weights)
    assert_user_error(
        run_inprocess(root, *_resume(ckpt, ckpt)), "trainer_state.safetensors", "optimizer.0.exp_avg", f"({n},)"
    )
