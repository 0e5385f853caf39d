"""CHOCO-SGD's compressed gossip: what each compressor keeps, the bytes a message carries, and runs."""

from __future__ import annotations

import math

import pytest
import torch

import gossiplab
from gossiplab.algorithms.choco import pack_bits, qsgd, random_k, top_k, unpack_bits
from gossiplab.config import ChocoConfig
from gossiplab.rundir import read_metrics
from resume import stopped_then_resumed

SHORT = ["num_sites=8", "train.steps=60", "eval.every=30", "gossip.every=10"]
CHOCO = ["gossip.algorithm=choco-sgd"]


def test_top_k_keeps_each_rows_largest_entries_and_sends_values_and_indices():
    difference = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    message = top_k(difference, ChocoConfig(kept=0.05), torch.Generator())
    kept = message.correction()
    assert message.message_bytes == 50 * 4 * 2
    assert [part.dtype for part in message.parts] == [torch.float32, torch.int32]  # as they travel
    assert [part.shape for part in message.parts] == [(4, 50), (4, 50)]
    assert ((kept != 0).sum(1) == 50).all()
    smallest_kept = torch.where(kept != 0, difference.abs(), math.inf).min(1).values
    largest_left = torch.where(kept == 0, difference.abs(), 0.0).max(1).values
    assert (smallest_kept >= largest_left).all()
    assert torch.equal(kept[kept != 0], difference[kept != 0])


def test_random_k_keeps_k_entries_unscaled_and_sends_values_and_a_seed():
    difference = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    message = random_k(difference, ChocoConfig(kept=0.05), torch.Generator().manual_seed(1))
    kept = message.correction()
    assert message.message_bytes == 50 * 4 + 8 and message.parts[0].shape == (4, 50)
    assert ((kept != 0).sum(1) == 50).all()
    assert torch.equal(kept[kept != 0], difference[kept != 0])
    again = random_k(difference, ChocoConfig(kept=0.05), torch.Generator().manual_seed(1)).correction()
    assert torch.equal(again, kept)  # the receiver draws the same indices from the seed


def test_qsgd_is_unbiased_before_its_scaling_and_sends_a_norm_and_bits():
    """tau Q(x) averages to x over many draws (the stochastic rounding is unbiased); a message is
    the norm and, per entry, a sign bit and ceil(log2(s + 1)) level bits."""
    difference = torch.randn(1, 256, generator=torch.Generator().manual_seed(0))
    options, generator = ChocoConfig(levels=4), torch.Generator().manual_seed(1)
    tau = 1 + min(256 / 4**2, math.sqrt(256) / 4)
    draws = [qsgd(difference, options, generator).correction() for _ in range(4000)]
    torch.testing.assert_close(tau * torch.stack(draws).mean(0), difference, rtol=0, atol=0.08)
    quantized = tau * draws[0] / torch.linalg.vector_norm(difference) * 4  # integer levels 0..4
    torch.testing.assert_close(quantized.abs(), quantized.abs().round(), rtol=0, atol=1e-4)
    message = qsgd(difference, options, generator)
    assert message.message_bytes == 4 + math.ceil(256 * (1 + 3) / 8)
    assert [part.dtype for part in message.parts] == [torch.float32, torch.int8]  # norm; sign and level


@pytest.mark.parametrize(("levels", "width"), [(1, 9), (4, 256), (16, 1001), (200, 37), (40000, 5)])
def test_qsgd_travels_packed_in_exactly_its_message_bytes_and_unpacks_to_the_same_correction(levels, width):
    """What crosses processes is the norm and 1 + ceil(log2(s + 1)) bits per entry: as many bytes
    as the run is charged, and the receiver decodes the sender's correction bit for bit."""
    difference = torch.randn(3, width, generator=torch.Generator().manual_seed(levels))
    difference[0, :2] = 0.0  # level 0 of either sign
    message = qsgd(difference, ChocoConfig(levels=levels), torch.Generator().manual_seed(2))
    wire = message.pack(*message.parts)
    assert [part.dtype for part in wire] == [torch.float32, torch.uint8]
    assert all(sum(part[i].numel() * part.element_size() for part in wire) == message.message_bytes for i in range(3))
    assert all(torch.equal(a, b) for a, b in zip(message.unpack(*wire), message.parts, strict=True))
    assert torch.equal(message.decode(*message.unpack(*wire)), message.correction())


def test_packed_bits_are_the_codes_most_significant_first():
    codes = torch.tensor([[5, 0, 7], [1, 2, 3]])
    packed = pack_bits(codes, 3)  # 101 000 111 + 7 padding bits; 001 010 011 + padding
    assert packed.tolist() == [[0b10100011, 0b10000000], [0b00101001, 0b10000000]]
    assert torch.equal(unpack_bits(packed, 3, 3), codes)


def test_choco_without_compression_is_dsgd_and_compressed_it_sends_what_it_says(tmp_path):
    """Keeping every entry with gamma = 1 is DSGD's round (x_hat = x, then x <- W x), charged two
    numbers per entry; top-k 10% sends k values and k indices per message and still pulls the
    sites together (consensus far below local training's, merged model above it)."""
    dsgd = gossiplab.run("default", SHORT, run_dir=tmp_path / "dsgd")
    exact = gossiplab.run("default", [*SHORT, *CHOCO, "choco.kept=1", "choco.gamma=1"], run_dir=tmp_path / "exact")
    for ours, theirs in zip(read_metrics(exact.run_dir / "metrics.jsonl"), read_metrics(dsgd.run_dir / "metrics.jsonl"),
                            strict=True):  # fmt: skip
        assert ours["mmga"] == pytest.approx(theirs["mmga"], abs=2e-3)
        assert ours["bytes_sent"] == 2 * theirs["bytes_sent"]
    compressed = gossiplab.run("default", [*SHORT, *CHOCO], run_dir=tmp_path / "compressed")
    parameters, k = compressed.final["num_parameters"], math.ceil(0.1 * compressed.final["num_parameters"])
    assert compressed.final["bytes_sent"] == dsgd.final["bytes_sent"] // (parameters * 4) * k * 8
    local = gossiplab.run("local-only", SHORT, run_dir=tmp_path / "local")
    assert compressed.final["consensus_distance"] < 0.5 * local.final["consensus_distance"]
    assert compressed.final["mmga"] > local.final["mmga"]


@pytest.mark.parametrize("compressor", ["random-k", "qsgd"])
def test_random_compressors_resume_exactly(small_config, tmp_path, compressor):
    config = small_config("default", *CHOCO, f"choco.compressor={compressor}", "gossip.every=5")
    gossiplab.run(config, run_dir=tmp_path / "whole")
    stopped_then_resumed(config, tmp_path / "split", stop_step=40)
    assert (tmp_path / "split" / "metrics.jsonl").read_bytes() == (tmp_path / "whole" / "metrics.jsonl").read_bytes()


def test_bad_choco_values_are_refused_by_field():
    with pytest.raises(gossiplab.ConfigError, match=r"choco\.kept' = 0\.0: must be in \(0, 1\]"):
        gossiplab.build_config("default", [*CHOCO, "choco.kept=0"])
    with pytest.raises(gossiplab.ConfigError, match=r"choco\.compressor.*top-k, random-k, qsgd"):
        gossiplab.build_config("default", [*CHOCO, "choco.compressor=top-10"])
