"""The owner's bridge for hybrid PEMA: fitted without the sink, measured on held-out text, signed, applied."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_LAYOUT, sentiment_examples, write_jsonl
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from transformers import PreTrainedModel

from offsite.client.cli import main as client_main
from offsite.client.local_model import load_bridge
from offsite.client.memory import build_memory_local, hybrid_representer
from offsite.client.pema_generation import emulator_reader
from offsite.client.training.pema import train_pema_bundle
from offsite.common.architectures import blocks
from offsite.common.bridge import Bridge, BridgedRepresenter
from offsite.common.contract import BRIDGE_WEIGHTS_FILE
from offsite.common.emulator_loading import load_emulator
from offsite.common.generation.steppers import LocalStepper
from offsite.common.manifest import BundleError, read_manifest, write_manifest
from offsite.common.model_loading import fingerprint, load_model
from offsite.common.pema.config import HYBRID_KEY_NOISE, PemaConfig
from offsite.common.pema.memory import Memory
from offsite.common.pema.representation import LocalRepresenter, teacher_forcing
from offsite.owner.cli import main as owner_main
from offsite.owner.emulator import EmulatorSpec, build_emulator
from offsite.owner.emulator.bridge import build_bridge, fit_bridge, paired_states
from offsite.owner.emulator.bundle import materialize
from offsite.owner.emulator.layout import LayoutError
from offsite.owner.emulator.public_text import GUTENBERG_HELDOUT_TEXT, GUTENBERG_TEXT, read_public_text, token_chunks
from offsite.owner.emulator.report_card import ReleaseRefused, check_release, heldout_windows

FIT_WINDOWS = 32
SINK_SCALE = 1e4  # SmolLM2's sink sits ~100 times above ordinary states; this is far beyond it
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir("llama")))


@pytest.fixture(scope="module")
def emulator(tiny) -> PreTrainedModel:
    return materialize(tiny.model, [0, 2, 4, 5])  # two middle blocks dropped


@pytest.fixture(scope="module")
def windows(tiny) -> torch.Tensor:
    text, _ = read_public_text(GUTENBERG_TEXT)
    return token_chunks(tiny.tokenizer, text[:100_000], 128, max_chunks=FIT_WINDOWS)


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    out = tmp_path_factory.mktemp("bridged") / "emulator"
    spec = EmulatorSpec.parse(f"uniform:{TINY_LAYOUT},bridge=1")
    build_emulator(tiny.model, tiny.tokenizer, spec, out, key, fingerprint(tiny.model), tiny.name, show_progress=False)
    return out, key


@contextmanager
def scaled(model: PreTrainedModel, position: int, factor: float) -> Iterator[None]:
    """Multiplies the last block's output at `position` by `factor`, as an attention sink or a massive token would."""

    def hook(_module, _args, output):
        states = (output[0] if isinstance(output, tuple) else output).clone()
        states[:, position] *= factor
        return (states, *output[1:]) if isinstance(output, tuple) else states

    handle = blocks(model)[-1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def resign(directory: Path, key: Ed25519PrivateKey) -> None:
    """What a careless owner would do: sign whatever now sits in the bundle."""
    body = {k: v for k, v in read_manifest(directory).items() if k not in ("files", "signed_by", "signature")}
    write_manifest(directory, body, key)


def test_the_bridge_brings_held_out_states_closer_to_the_full_models(tiny, emulator) -> None:
    published = build_bridge(tiny.model, emulator, tiny.tokenizer)
    card = published.card
    # measured on the held-out novel, which the fit (the training novels) never sees
    assert card.nmse_after < 0.8 * card.nmse_before
    assert card.cosine_after > card.cosine_before
    assert card.positions > 0 and published.facts["fit_rows"] > 0
    assert published.facts["hidden_size"] == published.bridge.hidden_size == tiny.model.config.hidden_size


def test_the_bridge_ships_its_held_out_residual_covariance(tiny, emulator) -> None:
    published = build_bridge(tiny.model, emulator, tiny.tokenizer)
    windows, _ = heldout_windows(tiny.tokenizer, GUTENBERG_HELDOUT_TEXT)
    pairs = list(paired_states(emulator, tiny.model, windows, tiny.tokenizer.bos_token_id))
    residual = torch.cat([p.full - published.bridge.apply(p.emulator) for p in pairs]).double()
    factor = published.bridge.residual
    assert factor is not None and published.facts["residual"]
    torch.testing.assert_close((factor @ factor.T).double(), torch.cov(residual.T), atol=1e-4, rtol=1e-3)


def test_hybrid_pema_trains_with_key_noise_only_on_a_bridged_memory(tiny, bundle, tmp_path: Path) -> None:
    directory, _ = bundle
    examples = sentiment_examples(6)
    config = PemaConfig(rank=4, max_epochs=1, gate_width=0, length_predictor=False)
    facts = {}
    for name, bridge in (("bridged", True), ("plain", False)):
        memory = tmp_path / f"memory-{name}"
        build_memory_local(directory, examples, memory, "float32", MAX_LENGTH, show_progress=False, bridge=bridge)
        trained = train_pema_bundle(memory, directory, config, tmp_path / f"pema-{name}", show_progress=False)
        training = read_manifest(tmp_path / f"pema-{name}")["training"]
        facts[name] = trained["key_noise"], training["key_noise"], training["memory_bridge"]
    assert facts == {"bridged": (HYBRID_KEY_NOISE, HYBRID_KEY_NOISE, True), "plain": (0.0, 0.0, False)}
    # Reading the emulator at generation, each adapter sees its states as its memory held them.
    prompt = tiny.tokenizer(examples[0].prompt)["input_ids"]
    emulator_states = LocalStepper(load_emulator(directory)[0]).start([prompt])[0]
    bridged = load_bridge(directory, read_manifest(directory), tiny.model)
    for name, expected in (("bridged", bridged.apply(emulator_states)), ("plain", emulator_states)):
        reader = emulator_reader(LocalStepper(tiny.model), tmp_path / f"pema-{name}", config, directory, None)
        torch.testing.assert_close(reader.start([prompt])[0], expected)
    with pytest.raises(ValueError, match="key noise must be >= 0"):
        memory = tmp_path / "memory-bridged"
        train_pema_bundle(memory, directory, config, tmp_path / "bad", show_progress=False, key_noise=-1.0)
    emulator, _, manifest = load_emulator(directory)
    bridge = load_bridge(directory, manifest, emulator)
    assert bridge is not None and bridge.residual is not None  # shipped in the signed bundle, and read back


def test_an_enormous_sink_state_does_not_change_the_fit(tiny, emulator, windows) -> None:
    plain = fit_bridge(emulator, tiny.model, windows)
    with scaled(emulator, 0, SINK_SCALE), scaled(tiny.model, 0, SINK_SCALE):
        sunk = fit_bridge(emulator, tiny.model, windows)
    assert torch.equal(sunk.bridge.weight, plain.bridge.weight) and torch.equal(sunk.bridge.bias, plain.bridge.bias)
    assert plain.rows == len(windows) * (windows.shape[1] - 1)
    with scaled(emulator, 0, 3.0):  # not massive either: position 0 is left out as such
        tripled = fit_bridge(emulator, tiny.model, windows)
    assert torch.equal(tripled.bridge.weight, plain.bridge.weight)
    with scaled(emulator, 7, 3.0):  # an ordinary change at an ordinary position does reach the fit
        moved = fit_bridge(emulator, tiny.model, windows)
    assert not torch.allclose(moved.bridge.weight, plain.bridge.weight)


def test_a_massive_state_elsewhere_is_left_out_of_the_fit(tiny, emulator, windows) -> None:
    plain = fit_bridge(emulator, tiny.model, windows)
    with scaled(tiny.model, 7, SINK_SCALE):
        outlier = fit_bridge(emulator, tiny.model, windows)
    assert outlier.rows == plain.rows - len(windows)  # one massive row per window, dropped
    change = (outlier.bridge.weight - plain.bridge.weight).norm() / plain.bridge.weight.norm()
    assert change < 0.05


def test_the_bundle_ships_the_bridge_signed_with_its_figures(tiny, bundle) -> None:
    directory, _ = bundle
    emulator, _, manifest = load_emulator(directory)
    assert BRIDGE_WEIGHTS_FILE in manifest["files"]
    assert manifest["bridge"]["file"] == BRIDGE_WEIGHTS_FILE
    assert manifest["bridge"]["hidden_size"] == tiny.model.config.hidden_size
    figures = manifest["report_card"]["bridge"]
    for name in ("cosine", "nmse"):
        assert figures[f"{name}_before"] != figures[f"{name}_after"]
    assert 0.0 <= figures["top1_emulator"] <= 1.0 and 0.0 <= figures["top1_bridged"] <= 1.0
    assert min(figures[f"perplexity_{name}"] for name in ("emulator", "bridged", "full")) > 1.0
    bridge = load_bridge(directory, manifest, emulator)
    assert bridge is not None and bridge.hidden_size == tiny.model.config.hidden_size


def test_a_tampered_bridge_is_refused(bundle, tmp_path: Path) -> None:
    directory = shutil.copytree(bundle[0], tmp_path / "emulator")
    path = directory / BRIDGE_WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"bridge\.safetensors: sha256 does not match"):
        load_emulator(directory)


def test_a_malformed_bridge_is_refused_even_when_signed(bundle, tmp_path: Path) -> None:
    directory = shutil.copytree(bundle[0], tmp_path / "emulator")
    key = bundle[1]
    emulator, _, _ = load_emulator(directory)
    Bridge(torch.eye(16), torch.zeros(16)).save(directory / BRIDGE_WEIGHTS_FILE)
    resign(directory, key)
    _, _, manifest = load_emulator(directory)
    with pytest.raises(BundleError, match=r"weight has shape \[16, 16\], but the emulator's hidden size 32"):
        load_bridge(directory, manifest, emulator)
    (directory / BRIDGE_WEIGHTS_FILE).write_bytes(b"not safetensors")
    resign(directory, key)
    _, _, manifest = load_emulator(directory)
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        load_bridge(directory, manifest, emulator)


def test_a_hybrid_memory_keys_are_the_bridged_emulator_states(bundle, tmp_path: Path) -> None:
    directory, _ = bundle
    examples = sentiment_examples(6)
    bridged = build_memory_local(directory, examples, tmp_path / "bridged", "float32", MAX_LENGTH, show_progress=False)
    plain = build_memory_local(
        directory, examples, tmp_path / "plain", "float32", MAX_LENGTH, show_progress=False, bridge=False
    )
    assert bridged.info["bridge"] is True and plain.info["bridge"] is False
    assert Memory.open(tmp_path / "bridged").info["bridge"] is True  # recorded in memory.json
    emulator, tokenizer, manifest = load_emulator(directory)
    bridge = load_bridge(directory, manifest, emulator)
    assert bridge is not None
    contexts = teacher_forcing(tokenizer, examples, MAX_LENGTH)
    states = LocalRepresenter(emulator).represent([c.inputs for c in contexts])
    raw = torch.cat([state[c.start - 1 :] for c, state in zip(contexts, states, strict=True)])
    expected = raw @ bridge.weight.T + bridge.bias
    torch.testing.assert_close(torch.from_numpy(np.array(bridged.keys)), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(np.array(plain.keys)), raw, atol=1e-4, rtol=1e-4)
    assert isinstance(hybrid_representer(directory), BridgedRepresenter)
    assert isinstance(hybrid_representer(directory, bridge=False), LocalRepresenter)


def test_the_bridge_is_a_spec_option_of_every_method() -> None:
    assert EmulatorSpec.parse(f"lowrank:{TINY_LAYOUT},bridge=1").parsed_options()["bridge"] is True
    assert EmulatorSpec.parse(f"uniform:{TINY_LAYOUT},bridge=1").id != EmulatorSpec.parse(f"uniform:{TINY_LAYOUT}").id
    with pytest.raises(LayoutError, match="bridge='maybe'"):
        EmulatorSpec.parse(f"distill:{TINY_LAYOUT},bridge=maybe")


def test_the_release_gate_weighs_what_the_bridge_reveals() -> None:
    card = {"perplexity": 20.0, "full_perplexity": 10.0, "perplexity_ratio": 2.0}
    check_release("e", {**card, "bridge": {"perplexity_bridged": 18.0, "perplexity_full": 10.0}}, 0.5)
    with pytest.raises(ReleaseRefused, match="bridge brings it too close"):
        check_release("e", {**card, "bridge": {"perplexity_bridged": 11.0, "perplexity_full": 10.0}}, 0.5)


def test_build_emulator_bridge_and_memory_build_no_bridge(
    tiny_model_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emulator, store = tmp_path / "emulator", tmp_path / "store"
    umask = os.umask(0o022)  # offsite-owner sets the store's umask for the rest of the process
    try:
        owner_main(
            ["build-emulator", "--model", str(tiny_model_dir("llama")), "--layout", TINY_LAYOUT, "--bridge"]
            + ["--out", str(emulator), "--store", str(store), "--json"]
        )
    finally:
        os.umask(umask)
    built = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert built["bridge"]["nmse_after"] < built["bridge"]["nmse_before"]
    data = write_jsonl(sentiment_examples(3), tmp_path / "train.jsonl")
    common = ["memory", "build", "--emulator", str(emulator), "--data", str(data), "--json"]
    client_main([*common, "--out", str(tmp_path / "bridged")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bridge"] is True
    client_main([*common, "--out", str(tmp_path / "plain"), "--no-bridge"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bridge"] is False
