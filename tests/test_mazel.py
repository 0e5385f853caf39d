"""MAZEL: text-embedding heads over private class names, frozen encoders, influence weights,
gossip and learning-rate schedulers, and the bad inputs they must refuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from gossiplab.assembly import build_experiment
from gossiplab.catalogue import build_config
from gossiplab.config import ConfigError, ModelConfig, TrainConfig
from gossiplab.encoders import EncoderError, ImageEncoder, cached_image_features, clip_encoders, conse_embeddings
from gossiplab.mixing import influence, influence_share, uniform
from gossiplab.models import TextEmbeddingHead, build_model
from gossiplab.optim import learning_rate
from gossiplab.rundir import read_metrics
from gossiplab.runner import Runner
from gossiplab.schedule import GossipSchedule, cosine_steps, two_stage_steps, uniform_steps
from gossiplab.topology import build_adjacency

# 8 sites over the 5 real domains, a few hundred images per source: features encode in seconds;
# the ConSE start and the learning rate that trains it in 150 steps (the presets' pre-aligned start
# is tested in test_prealign.py)
SMALL_MAZEL = [
    "data.train_per_source=400", "data.test_per_source=150", "train.steps=150", "eval.every=50",
    "model.pre_alignment=none", "train.lr=0.001", "train.batch_size=32", "gossip.every=50",
]  # fmt: skip


def finish(config, run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    return Runner(config, run_dir, show_progress=False).run()


@pytest.fixture(scope="module")
def mazel_and_mdsl(tmp_path_factory):
    root = tmp_path_factory.mktemp("mazel")
    mazel = finish(build_config("mazel-8site", SMALL_MAZEL), root / "mazel")
    mdsl = build_config("mazel-8site", [*SMALL_MAZEL, "model.head=linear", "model.zero_shot_init=false"])
    return mazel, finish(mdsl, root / "mdsl"), root


def test_mazel_starts_zero_shot_and_learns_each_sites_own_classes(mazel_and_mdsl):
    mazel, _, root = mazel_and_mdsl
    zero_shot = read_metrics(root / "mazel" / "metrics.jsonl")[0]
    # ConSE from ImageNet: above chance (1/10 per site) before any training, on classes never trained on
    assert zero_shot["step"] == 0 and zero_shot["ala"] > 0.12
    assert mazel["ala"] > 0.7 and mazel["aga"] > 0.5


def test_mdsl_head_over_the_union_label_space_learns_too(mazel_and_mdsl):
    _, mdsl, _ = mazel_and_mdsl
    assert mdsl["ala"] > 0.6  # 40 classes in the union: chance is 0.025


def test_zero_shot_residual_outputs_exactly_the_zero_shot_embedding_at_step_0():
    experiment = build_experiment(build_config("mazel-8site", SMALL_MAZEL))
    population, federation = experiment.population, experiment.federation
    body = population.module.encoder
    inputs = federation.test_x[:64]
    params = {k.removeprefix("encoder."): v for k, v in population.views(population.theta[0]).items()}
    embedding = torch.func.functional_call(body, params, (inputs,))
    torch.testing.assert_close(embedding, inputs[:, : body.zero_shot_dim])
    # scored in each test sample's own site label space: digits never predicted on a fashion site
    allowed = population.class_mask[federation.test_site]
    predictions = population.predict(population.theta[:1], federation.test_x, allowed)[0]
    assert allowed[torch.arange(len(predictions)), predictions].all()
    assert not allowed.all()


def test_text_head_is_cosine_similarity_scaled_and_independent_of_the_number_of_classes():
    names = torch.randn(7, 5)
    head = TextEmbeddingHead(torch.nn.Identity(), names, logit_scale=20.0)
    v = torch.randn(3, 5)
    expected = 20.0 * F.cosine_similarity(v[:, None, :], names[None, :, :], dim=-1)
    torch.testing.assert_close(head(v), expected)
    config = ModelConfig(head="text", hidden=[16])
    ten, forty = (build_model(config, (12,), c, torch.randn(c, 5)) for c in (10, 40))
    # a site joining with new class names needs no change to the model: same parameters
    assert [p.shape for p in ten.parameters()] == [p.shape for p in forty.parameters()]
    linear = ModelConfig(head="linear", hidden=[16])
    assert sum(p.numel() for p in build_model(linear, (12,), 40).parameters()) > sum(
        p.numel() for p in build_model(linear, (12,), 10).parameters()
    )


def test_conse_mixes_the_top_classes_text_by_their_probabilities():
    text = F.normalize(torch.randn(20, 6), dim=-1)
    logits = torch.full((1, 20), -30.0)
    logits[0, 3], logits[0, 7] = 2.0, 2.0 + np.log(3.0)  # p(7) = 3 p(3), the rest ~0
    expected = F.normalize(0.25 * text[3] + 0.75 * text[7], dim=0)
    torch.testing.assert_close(conse_embeddings(logits, text, top=2)[0], expected)


def test_image_features_are_cached_and_a_changed_image_set_is_not_served_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("GOSSIPLAB_CACHE", str(tmp_path))
    calls = []

    def encode(images):
        calls.append(len(images))
        return images.float().flatten(1), images.float().mean((1, 2, 3))[:, None]

    encoder = ImageEncoder("fake", 4, encode)
    images = torch.randint(0, 256, (10, 1, 2, 2), dtype=torch.uint8)
    first = cached_image_features(encoder, images)
    second = cached_image_features(encoder, images)
    assert calls == [10] and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    cached_image_features(encoder, images.flip(0))
    assert calls == [10, 10]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP of the ViT architecture, saved as a user's local CLIP would be."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "a", "photo", "of", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "."]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {
        **small,
        "vocab_size": 32,
        "max_position_embeddings": 16,
        "bos_token_id": 0,
        "eos_token_id": 15,
    }  # pooled at "."
    vision = {**small, "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    return model, path


def test_clip_loads_from_a_local_path_and_embeds_like_the_saved_model(tiny_clip):
    model, path = tiny_clip
    image_encoder, text_encoder = clip_encoders(str(path))
    assert (image_encoder.feature_dim, text_encoder.dim) == (32, 24)
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    features, zero_shot = image_encoder.encode(images)
    x = 1.0 - F.interpolate(images.float() / 255.0, size=(32, 32), mode="bilinear", antialias=True).expand(
        -1, 3, -1, -1
    )
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=(x - mean) / std).pooler_output
        expected = F.normalize(model.visual_projection(pooled), dim=-1)
    torch.testing.assert_close(features, pooled)
    torch.testing.assert_close(zero_shot, expected)
    names = text_encoder.encode(["a photo of a 3 .", "a photo of a 7 ."])
    assert names.shape == (2, 24) and torch.allclose(names.norm(dim=-1), torch.ones(2))


def test_a_run_on_a_local_clip_starts_at_clips_own_zero_shot_and_trains(tiny_clip, tmp_path):
    model, path = tiny_clip
    overrides = [
        "data.sources=digits-8x8",
        "data.partition=iid",
        "num_sites=4",
        "model.backbone=clip",
        f"model.clip_path='{path}'",
        "model.text_encoder=clip",
        "model.head=text",
        "model.zero_shot_init=true",
        "model.hidden=[]",
        "model.prompt='a photo of a {} .'",
        "train.optimizer=adam",
        "train.lr=0.003",
        "train.steps=60",
        "eval.every=30",
    ]
    config = build_config("default", overrides)
    experiment = build_experiment(config)
    population, federation = experiment.population, experiment.federation
    image = federation.test_x[:, :24]  # CLIP's own projected image embedding
    tokens = AutoTokenizer.from_pretrained(path)(
        [f"a photo of a {n} ." for n in federation.class_names], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        text = F.normalize(model.text_projection(model.text_model(**tokens).pooler_output), dim=-1)
    clip_zero_shot = (image @ text.T).argmax(-1)
    assert torch.equal(population.predict(population.theta[:1], federation.test_x)[0], clip_zero_shot)
    run_dir = tmp_path / "clip"
    run_dir.mkdir()
    Runner(config, run_dir, show_progress=False, experiment=experiment).run()
    losses = [row["train_loss"] for row in read_metrics(run_dir / "metrics.jsonl")[1:]]
    assert losses[-1] < losses[0]


def test_mismatched_text_and_image_embedding_sizes_are_refused(tiny_clip):
    _, path = tiny_clip
    config = build_config(
        "default",
        [
            "data.sources=digits-8x8",
            "num_sites=4",
            "model.backbone=clip",
            f"model.clip_path='{path}'",
            "model.head=text",
            "model.text_encoder=minilm-l6",
            "model.zero_shot_init=true",
        ],
    )
    with pytest.raises(EncoderError, match=r"model.text_encoder 'minilm-l6' embeds class names in 384 .* has 24"):
        build_experiment(config)


@pytest.mark.parametrize(
    ("names", "match"),
    [([], "has no class names"), (["cat", "Cat "], "names two classes alike: 'cat' and 'Cat '")],
)
def test_sites_with_no_or_duplicate_class_names_are_refused(tmp_path, names, match):
    rng = np.random.default_rng(0)
    count = max(len(names), 1)
    x = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", x=x, y=np.arange(40) % count, class_names=np.array(names, dtype=str))
    config = build_config(
        "default", [f"data.sources='{tmp_path / 'mine.npz'}'", "num_sites=2", "data.min_site_samples=4"]
    )
    with pytest.raises(ConfigError, match=match):
        build_experiment(config)


def test_bad_mazel_settings_are_named_before_any_work():
    with pytest.raises(ConfigError) as error:
        build_config(
            "default",
            [
                "gossip.schedule=cosine",
                "gossip.rounds=5000",
                "model.zero_shot_init=true",
                "model.prompt='no slot'",
                "model.backbone=clip",
            ],
        )
    message = str(error.value)
    assert "field 'gossip.rounds' = 5000: must be in [1, train.steps/2 = 1000]" in message
    assert "field 'model.zero_shot_init' = True: needs model.head = 'text'" in message
    assert "field 'model.prompt' = 'no slot'" in message
    assert "field 'model.clip_path' = ''" in message


@pytest.mark.parametrize("rounds", [1, 2, 9, 46, 100])
def test_round_schedules_place_exactly_the_rounds_asked_for(rounds):
    total = 1000
    for steps in (
        uniform_steps(total, rounds),
        two_stage_steps(total, rounds, 0.5, 0.67),
        cosine_steps(total, rounds, 0.1),
    ):
        assert len(set(steps)) == rounds and all(1 <= s <= total for s in steps)
        assert max(steps) < total  # never gossip in the very last step
    if rounds >= 9:  # front-loaded: more rounds in the first half than in the second
        for steps in (two_stage_steps(total, rounds, 0.5, 0.67), cosine_steps(total, rounds, 0.1)):
            assert sum(s <= total / 2 for s in steps) > sum(s > total / 2 for s in steps)


def test_two_stage_matches_the_papers_figure_and_schedules_fire_there():
    assert two_stage_steps(4600, 9, 0.5, 0.67) == [383, 767, 1150, 1533, 1917, 2300, 2875, 3450, 4025]
    config = build_config("default", ["gossip.schedule=two-stage", "gossip.rounds=9", "train.steps=4600"])
    schedule = GossipSchedule.from_config(config.gossip, 4600)
    assert [t for t in range(1, 4601) if schedule.gossips_at(t)] == two_stage_steps(4600, 9, 0.5, 0.67)


def test_learning_rate_schedules():
    cosine = TrainConfig(lr=0.1, steps=100, lr_schedule="cosine")
    assert learning_rate(cosine, 1) == pytest.approx(0.1) and learning_rate(cosine, 51) == pytest.approx(0.05)
    warm = TrainConfig(lr=0.1, steps=100, lr_schedule="warmup-constant", warmup_steps=10)
    assert [learning_rate(warm, t) for t in (1, 5, 10, 11, 100)] == pytest.approx([0.01, 0.05, 0.1, 0.1, 0.1])
    warm_cosine = TrainConfig(lr=0.1, steps=110, lr_schedule="warmup-cosine", warmup_steps=10)
    assert learning_rate(warm_cosine, 11) == pytest.approx(0.1) and learning_rate(warm_cosine, 61) == pytest.approx(
        0.05
    )


def test_influence_weights_are_a_softmax_over_the_site_and_its_peers_scores():
    """MAZEL's "Random (softmax)": W_i = softmax(<g_i, g_j> / ||g_i||^2 / T) over i and its peers."""
    adjacency = build_adjacency("complete", 3, 0, seed=0)
    grad = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    weights = influence(adjacency, grad, temperature=1.0)
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    # site 0: scores (own 1, peer 1: 2, peer 2: 0)
    torch.testing.assert_close(weights[0], torch.softmax(torch.tensor([1.0, 2.0, 0.0]), 0))
    # site 2: (0, 0, own 1): its own model weighs e times each peer's
    torch.testing.assert_close(weights[2], torch.softmax(torch.tensor([0.0, 0.0, 1.0]), 0))
    # one peer a round: unequal weights that follow the score's size, not 50/50 or nothing
    pairs = torch.tensor([[False, True], [True, False]])
    for peer, expected in ((2.0, 1 / (1 + torch.e**-1)), (0.0, 1 / (1 + torch.e)), (-1.0, 1 / (1 + torch.e**2))):
        w = influence(pairs, torch.tensor([[1.0], [peer]]), temperature=1.0)
        assert float(w[0, 1]) == pytest.approx(expected)
    # a high temperature is uniform mixing; a low one picks the best-scored candidate
    torch.testing.assert_close(influence(adjacency, grad, temperature=1e6), uniform(adjacency), atol=1e-5, rtol=0)
    assert int(influence(adjacency, grad, temperature=1e-3)[0].argmax()) == 1


def test_the_share_rule_keeps_the_self_weight_and_splits_the_rest_by_positive_influence():
    adjacency = build_adjacency("complete", 3, 0, seed=0)
    base = uniform(adjacency)  # 1/3 everywhere
    grad = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    weights = influence_share(base, grad, lr=0.1)
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    # site 0: neighbour 1 helps (<g0, g1> = 1), neighbour 2 does not (0): all 2/3 goes to 1
    torch.testing.assert_close(weights[0], torch.tensor([1 / 3, 2 / 3, 0.0]))
    # site 2: no neighbour helps: it keeps its own model
    torch.testing.assert_close(weights[2], torch.tensor([0.0, 0.0, 1.0]))
    # equal positive influence on a one-peer matching is plain uniform averaging
    pairs = build_adjacency("random-one-peer", 4, 0, seed=0)
    torch.testing.assert_close(influence_share(uniform(pairs), torch.ones(4, 5), lr=0.1), uniform(pairs))


def test_influence_weighted_gossip_learns_and_weighs_neighbours_unequally(tmp_path):
    config = build_config("default", ["num_sites=8", "train.steps=60", "eval.every=30", "gossip.mixing=influence"])
    experiment = build_experiment(config)
    (tmp_path / "run").mkdir()
    summary = Runner(config, tmp_path / "run", show_progress=False, experiment=experiment).run()
    assert summary["ala"] > 0.3
    adjacency = build_adjacency("complete", 8, 0, seed=0)
    weights = experiment.mixing_rule(adjacency, experiment)
    torch.testing.assert_close(weights.sum(1), torch.ones(8))
    assert not torch.allclose(weights, uniform(adjacency))


def test_full_finetuning_of_a_small_model_on_pixels_with_the_text_head(tmp_path):
    """MAZEL's "full FT" mode: the whole image model trains (here the MLP on pixels, no frozen
    backbone, no zero-shot start), scored against each site's own class-name embeddings."""
    overrides = [*SMALL_MAZEL, "model.backbone=pixels", "model.zero_shot_init=false", "model.hidden=[128]"]
    summary = finish(build_config("mazel-8site", overrides), tmp_path / "full-ft")
    assert summary["num_parameters"] == 784 * 128 + 128 + 128 * 384 + 384  # output: the text dimension
    assert summary["ala"] > 0.5
