"""rewardlab.align mechanics: the ReFL step as ImageReward's ReFL.py, DRaFT/AlignProp truncation, LoRA in
diffusers format, kill + resume, data validation, config and CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner
from support import record_calls, shared_file

from rewardlab.align import backprop
from rewardlab.align import finetune as finetune_module
from rewardlab.align.backprop import draw_grad_steps, sample_with_grad_window
from rewardlab.align.data import batch_indices, load_image_text_pairs, load_prompts
from rewardlab.align.finetune import FinetuneConfig, Finetuner
from rewardlab.align.refl import draw_stop_index, refl_loss, refl_x0
from rewardlab.cli import cli
from rewardlab.diffusion import fresh_scheduler, wrap_pipeline
from rewardlab.errors import ConfigError, DataError
from rewardlab.scoring.ensemble import RewardEnsemble
from rewardlab.testing.diffusion import tiny_pipeline
from rewardlab.testing.rewards import colour_scorer

PROMPTS = ["a red circle", "a blue square", "a green cat", "a red house"]


class RecordingDenoiser(torch.nn.Module):
    """Wraps the UNet and records every call: timestep, grad mode, input latents, output, conditioning."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.calls = []

    def forward(self, latents, t, **kwargs):
        out = self.unet(latents, t, **kwargs)
        self.calls.append({"t": int(t), "grad": torch.is_grad_enabled(), "x": latents.detach().clone(),
                           "out": out.sample.detach().clone(), "cond": kwargs["encoder_hidden_states"].detach().clone()})
        return out


def _tuner(tmp_path, seed: int = 0, pretrain_pairs=None, **settings) -> Finetuner:
    values = {"output_dir": str(tmp_path / "run"), "batch_size": 2, "max_steps": 4, "validation_every": 0,
              "validation_count": 2, "validation_guidance_scale": 1.0, "num_steps": 40, "save_every": 0,
              "cpu": True, "lr": 1e-2}
    values.update(settings)
    return Finetuner(FinetuneConfig(**values), pipeline=tiny_pipeline(tmp_path / "pipe", seed),
                     reward=RewardEnsemble([colour_scorer()]), prompts=PROMPTS, validation_prompts=PROMPTS[:2],
                     pretrain_pairs=pretrain_pairs)


# -- the ReFL step -----------------------------------------------------------------------------------


def test_refl_loss_by_hand():
    rewards = torch.tensor([1.0, 3.0], dtype=torch.float64, requires_grad=True)
    loss = refl_loss(rewards)  # relu(2 - [1, 3]).mean() * 1e-3 = (1 + 0) / 2 * 1e-3
    assert loss.item() == pytest.approx(5e-4, abs=1e-12)
    loss.backward()
    assert rewards.grad.tolist() == pytest.approx([-5e-4, 0.0], abs=1e-12)  # zero where reward > margin


def test_stop_index_uniform_over_30_to_39_inclusive():
    rng = random.Random(0)
    draws = [draw_stop_index(rng) for _ in range(4000)]
    assert set(draws) == set(range(30, 40))
    counts = [draws.count(i) for i in range(30, 40)]
    assert min(counts) > 330 and max(counts) < 470  # 400 expected each


def test_refl_train_step_is_imagereward_refl(tmp_path, monkeypatch):
    """Instrumented scheduler and denoiser inside Finetuner.train_step: a 40-step schedule, steps before the
    stop index without grad, exactly one denoiser call with grad at timesteps[stop], no CFG, x0 = the
    DDPM formula, pixels = (vae.decode(x0 / scaling) / 2 + 0.5).clamp(0, 1), loss = relu(2 - r) * 1e-3."""
    tuner = _tuner(tmp_path, scheduler="ddpm")
    recorder = RecordingDenoiser(tuner.denoiser)
    tuner.denoiser = recorder
    schedulers, decoded, scored = [], [], []
    real_fresh = finetune_module.fresh_scheduler

    def recording_scheduler(pipeline, kind):
        scheduler = real_fresh(pipeline, kind)
        schedulers.append(scheduler)
        return scheduler

    monkeypatch.setattr(finetune_module, "fresh_scheduler", recording_scheduler)
    record_calls(monkeypatch, tuner.generator, "decode", decoded)
    record_calls(monkeypatch, tuner, "reward_loss", scored)
    stops = []
    for step in range(4):
        recorder.calls.clear()
        record = tuner.train_step(step)
        stop = record["stop_index"]
        stops.append(stop)
        scheduler = schedulers[-1]
        assert type(scheduler).__name__ == "DDPMScheduler" and len(scheduler.timesteps) == 40
        assert 30 <= stop <= 39
        assert len(recorder.calls) == stop + 1
        assert [c["t"] for c in recorder.calls] == scheduler.timesteps[: stop + 1].tolist()
        assert [c["grad"] for c in recorder.calls] == [False] * stop + [True]
        last = recorder.calls[-1]
        assert last["x"].shape[0] == 2  # no classifier-free guidance: batch not doubled
        alpha = scheduler.alphas_cumprod[last["t"]]
        x0 = (last["x"] - (1 - alpha).sqrt() * last["out"]) / alpha.sqrt()
        latents, pixels = decoded[-1]
        torch.testing.assert_close(latents, x0, atol=1e-5, rtol=1e-5)
        vae = tuner.pipeline.vae
        with torch.no_grad():
            manual = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(pixels, manual, atol=1e-5, rtol=1e-5)
        rewards, loss = scored[-1]
        assert loss.item() == pytest.approx(torch.relu(2.0 - rewards).mean().item() * 1e-3, rel=1e-6)
    assert len(set(stops)) > 1


def test_refl_x0_conditioning_is_the_prompt_embeddings(tmp_path):
    pipe = tiny_pipeline(tmp_path, 0)
    gen = wrap_pipeline(pipe)
    recorder = RecordingDenoiser(pipe.unet)
    conditioning = gen.encode(PROMPTS[:2], torch.device("cpu"))
    scheduler = fresh_scheduler(pipe)
    latents = gen.initial_latents(2, torch.Generator().manual_seed(0), torch.device("cpu"), scheduler)
    refl_x0(gen, recorder, scheduler, latents, conditioning, stop_index=31)
    embeds = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, False)[0]
    assert all(torch.equal(c["cond"], embeds) for c in recorder.calls)
    assert len(recorder.calls) == 32 and len(scheduler.timesteps) == 40


# -- DRaFT / AlignProp ----------------------------------------------------------------------------------


def test_draft_k_grad_only_in_last_k_steps(tmp_path):
    pipe = tiny_pipeline(tmp_path, 0)
    gen = wrap_pipeline(pipe)
    conditioning = gen.encode(PROMPTS[:2], torch.device("cpu"))
    for k in (1, 3):
        recorder = RecordingDenoiser(pipe.unet)
        scheduler = fresh_scheduler(pipe)
        latents = gen.initial_latents(2, torch.Generator().manual_seed(0), torch.device("cpu"), scheduler)
        final = sample_with_grad_window(gen, recorder, scheduler, latents, conditioning, 10, grad_from=10 - k)
        assert [c["grad"] for c in recorder.calls] == [False] * (10 - k) + [True] * k
        assert final.requires_grad
    # the sampler's final latents are the pipeline's own (same scheduler, seed and steps, no CFG)
    with torch.no_grad():
        scheduler = fresh_scheduler(pipe)
        latents = gen.initial_latents(1, torch.Generator().manual_seed(5), torch.device("cpu"), scheduler)
        ours = gen.decode(sample_with_grad_window(gen, pipe.unet, scheduler, latents, gen.encode(PROMPTS[:1], "cpu"),
                                                  10, grad_from=10))
    theirs = pipe(PROMPTS[:1], num_inference_steps=10, guidance_scale=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(5)).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_alignprop_truncation_strategies():
    rng = random.Random(0)
    assert draw_grad_steps(50, rng, "fixed", k=1) == 1
    uniform = [draw_grad_steps(50, rng, "uniform", k_min=2, k_max=6) for _ in range(500)]
    assert set(uniform) == {2, 3, 4, 5, 6}
    gauss = [draw_grad_steps(50, rng, "gaussian", k_min=1, k_max=50, k_mean=8, k_std=5) for _ in range(4000)]
    assert min(gauss) >= 1 and max(gauss) <= 50
    assert sum(gauss) / len(gauss) == pytest.approx(8.0 + 0.03, abs=0.4)  # N(8, 5) clipped below at 1
    with pytest.raises(ConfigError, match="draft_k=51"):
        draw_grad_steps(50, rng, "fixed", k=51)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    grads = []
    for checkpointing in (False, True):
        pipe = tiny_pipeline(tmp_path / str(checkpointing), 0)
        gen = wrap_pipeline(pipe)
        conditioning = gen.encode(PROMPTS[:2], torch.device("cpu"))
        scheduler = fresh_scheduler(pipe)
        latents = gen.initial_latents(2, torch.Generator().manual_seed(0), torch.device("cpu"), scheduler)
        final = sample_with_grad_window(gen, pipe.unet, scheduler, latents, conditioning, 8, grad_from=5,
                                        gradient_checkpointing=checkpointing)
        gen.decode(final).mean().backward()
        grads.append({n: p.grad.clone() for n, p in pipe.unet.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_alignprop_step_records_drawn_truncation(tmp_path, monkeypatch):
    tuner = _tuner(tmp_path, method="alignprop", num_steps=6, truncation="uniform", truncation_min=1,
                   truncation_max=4, grad_scale=1.0)
    calls = []
    real = backprop.sample_with_grad_window

    def spy(*args, **kwargs):
        calls.append(args[6])  # grad_from
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "sample_with_grad_window", spy)
    ks = [tuner.train_step(s)["grad_steps"] for s in range(5)]
    assert calls == [6 - k for k in ks] and all(1 <= k <= 4 for k in ks)


# -- LoRA, resume ----------------------------------------------------------------------------------------


def test_lora_loads_into_fresh_pipeline_and_reproduces_images(tmp_path):
    tuner = _tuner(tmp_path, method="draft", num_steps=6, max_steps=3, lora_rank=4, lora_alpha=8, grad_scale=1.0,
                   lr=5e-2)
    tuner.train()
    folder = tmp_path / "run" / "lora" / "final"
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    seeds = [3, 4]
    trained = tuner.generate(PROMPTS[:2], seeds, num_steps=6, guidance_scale=1.0)
    fresh = tiny_pipeline(tmp_path / "fresh", 0)
    fresh.set_progress_bar_config(disable=True)

    def images(pipe):
        return pipe(PROMPTS[:2], num_inference_steps=6, guidance_scale=1.0, output_type="pt",
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    base = images(fresh)
    fresh.load_lora_weights(str(folder))
    loaded = images(fresh)
    assert torch.equal(loaded, trained)
    assert (loaded - base).abs().max() > 1e-3  # the adapter changed the generator (alpha/rank = 2 kept)


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("variant", ["plain", "ema", "pretrain-separate"])
def test_kill_and_resume_gives_identical_lora_weights(tmp_path, variant):
    """With ``ema`` the exported LoRA is the EMA weights, and the EMA state itself must match too; with
    alternating pretraining on its own AdamW, that optimizer's state is resumed as well."""
    from PIL import Image
    from safetensors.torch import load_file

    from rewardlab.align.data import ImageTextPair

    ema = variant == "ema"
    settings = {"method": "draft", "num_steps": 5, "max_steps": 6, "save_every": 2, "grad_accum": 2,
                "grad_scale": 1.0, "ema": ema, "ema_decay": 0.5}
    if variant == "pretrain-separate":
        for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
            Image.new("RGB", (16, 16), colour).save(tmp_path / f"{i}.png")
        pairs = [ImageTextPair(str(tmp_path / f"{i}.png"), f"a {c} square") for i, c in enumerate(["red", "blue", "green"])]
        settings.update(pretrain_loss="alternate", pretrain_optimizer="separate", pretrain_lr=1e-3,
                        pretrain_pairs=pairs)
    _tuner(tmp_path / "a", **settings).train()
    reference = load_file(str(tmp_path / "a" / "run" / "lora" / "final" / "pytorch_lora_weights.safetensors"))

    def crash_at_five(step, tuner):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        tuner = _tuner(tmp_path / "b", **settings)
        tuner.step_callback = crash_at_five
        tuner.train()
    state = json.loads((tmp_path / "b" / "run" / "state" / "step-00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4
    _tuner(tmp_path / "b", **settings).train()
    resumed = load_file(str(tmp_path / "b" / "run" / "lora" / "final" / "pytorch_lora_weights.safetensors"))
    assert reference.keys() == resumed.keys() and reference
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    if ema:
        states = [torch.load(tmp_path / x / "run" / "state" / "step-00000006" / "ema.pt", weights_only=True)
                  for x in ("a", "b")]
        assert states[0]["optimization_step"] == states[1]["optimization_step"] == 6
        assert all(torch.equal(u, v) for u, v in zip(states[0]["shadow_params"], states[1]["shadow_params"], strict=True))
    log = [json.loads(line) for line in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    assert {"event": "resumed", "step": 4} in log
    assert (tmp_path / "b" / "run" / "gallery.html").is_file()


def test_ema_is_diffusers_ema_of_the_parameter_trajectory(tmp_path):
    """EMAModel's default schedule by hand: decay_k = min((1 + s) / (10 + s), ema_decay), s = k - 1 (0 at the
    first update), shadow = decay * shadow + (1 - decay) * weights after step k. The exported LoRA and the
    validation images use the EMA weights; training continues on the raw ones."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file

    from rewardlab.align.lora import lora_layers, trainable_state

    tuner = _tuner(tmp_path, method="draft", num_steps=4, max_steps=6, grad_scale=1.0, lr=5e-2, ema=True,
                   ema_decay=0.3)
    names = list(trainable_state(tuner.denoiser))
    trajectory = [{n: p.detach().clone() for n, p in trainable_state(tuner.denoiser).items()}]
    tuner.step_callback = lambda step, t: trajectory.append(
        {n: p.detach().clone() for n, p in trainable_state(t.denoiser).items()})
    summary = tuner.train()
    shadow = dict(trajectory[0])
    decays = []
    for k, weights in enumerate(trajectory[1:], start=1):
        s = k - 1
        decay = 0.0 if s <= 0 else min((1 + s) / (10 + s), 0.3)
        decays.append(decay)
        shadow = {n: decay * shadow[n] + (1 - decay) * weights[n] for n in names}
    ema = dict(zip(names, tuner.ema.shadow_params, strict=True))
    assert max(float((ema[n] - shadow[n]).abs().max()) for n in names) < 1e-6
    assert max(float((trajectory[-1][n] - shadow[n]).abs().max()) for n in names) > 1e-4  # EMA != last weights
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["ema_decay"] for r in log if "ema_decay" in r] == pytest.approx(decays, abs=1e-12)
    assert decays[:3] == pytest.approx([0.0, 2 / 11, 0.25]) and decays[3:] == [0.3] * 3  # capped by ema_decay
    # raw weights stay in the model; export and validation use the EMA ones
    assert all(torch.equal(p, trajectory[-1][n]) for n, p in trainable_state(tuner.denoiser).items())
    saved = load_file(str(tmp_path / "run" / "lora" / "final" / "pytorch_lora_weights.safetensors"))
    with tuner.ema_weights():
        expected = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(lora_layers(tuner.denoiser)[0]).items()}
        pixels = tuner.generate(PROMPTS[:2], tuner.validation_seeds())
    assert saved.keys() == expected.keys(), (saved.keys() ^ expected.keys())
    assert all(torch.equal(saved[k], expected[k]) for k in saved), max((saved[k] - expected[k]).abs().max() for k in saved)
    valid = tuner.score(pixels, PROMPTS[:2])["reward"]
    assert summary["valid_reward"] == pytest.approx(sum(valid) / 2, rel=1e-6)


# -- data, config, CLI -------------------------------------------------------------------------------------


def test_prompt_files_refl_data_text_jsonl(tmp_path):
    prompts = load_prompts(shared_file("refl_data.json"))
    assert len(prompts) == 10000 and prompts[0].startswith("brittle, abstract emotion")
    (tmp_path / "p.txt").write_text("# comment\na cat\n\n a dog \n")
    assert load_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n"b"\n{"text": "c"}\n')
    assert load_prompts(tmp_path / "p.jsonl") == ["a", "b", "c"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2 field 'text': prompt must be a string"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "bad.json").write_text('[{"text": "a"}, {"image": "x"}]')
    with pytest.raises(DataError, match=r"bad.json item 2: no prompt field"):
        load_prompts(tmp_path / "bad.json")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken.jsonl line 2: not valid JSON"):
        load_prompts(tmp_path / "broken.jsonl")


def test_image_text_pairs_validated(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 12), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "pairs.jsonl").write_text('{"file_name": "a.png", "text": "red"}\n')
    pairs = load_image_text_pairs(tmp_path / "pairs.jsonl")
    assert pairs[0].image == str(tmp_path / "a.png") and pairs[0].text == "red"
    (tmp_path / "missing.jsonl").write_text('{"file_name": "a.png", "text": "red"}\n{"image": "b.png", "text": "x"}\n')
    with pytest.raises(DataError, match=r"missing.jsonl line 2 field 'image': image .*b.png not found"):
        load_image_text_pairs(tmp_path / "missing.jsonl")


def test_batches_are_deterministic_and_cover_every_item():
    first = [batch_indices(10, 4, i, seed=1) for i in range(5)]
    assert first == [batch_indices(10, 4, i, seed=1) for i in range(5)]
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_recipes_load_and_overrides(tmp_path):
    from importlib import resources

    root = resources.files("rewardlab.align") / "recipes"
    refl = FinetuneConfig.from_yaml(str(root / "refl-sd14.yaml"))
    assert (refl.method, refl.num_steps, refl.refl_stop_min, refl.refl_stop_max) == ("refl", 40, 30, 39)
    assert (refl.lr, refl.weight_decay, refl.batch_size, refl.grad_accum, refl.max_steps) == (1e-5, 1e-2, 2, 4, 100)
    assert refl.effective_grad_scale == 1e-3 and refl.parameters == "full" and refl.pretrain_loss == "off"
    assert refl.ema and refl.ema_decay == 0.9999  # train_refl.sh --use_ema, EMAModel's default decay
    draft = FinetuneConfig.from_yaml(str(root / "draft-lora-sd15.yaml"), ["draft_k=2", "pretrain_loss=weighted"])
    assert draft.draft_k == 2 and draft.pretrain_loss == "weighted" and draft.lora_rank == 32
    assert draft.pretrain_optimizer == "separate" and not draft.ema
    with pytest.raises(ConfigError, match="pretrain_optimizer: 'both' is not one of shared, separate"):
        FinetuneConfig.from_yaml(None, ["prompts=p.txt", "pretrain_optimizer=both"])
    with pytest.raises(ConfigError, match=r"ema_decay: 1.0 must be in \[0, 1\)"):
        FinetuneConfig.from_yaml(None, ["prompts=p.txt", "ema_decay=1.0"])
    with pytest.raises(ConfigError, match="ReFL trains without classifier-free guidance"):
        FinetuneConfig.from_yaml(None, ["prompts=p.txt", "train_guidance_scale=5"])
    with pytest.raises(ConfigError, match=r"stop range \[30, 39\] must lie within 0..num_steps-1 = 9"):
        FinetuneConfig.from_yaml(None, ["prompts=p.txt", "num_steps=10"])
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        FinetuneConfig.from_yaml(None, ["learning_rate=1"])


def test_cli_runs_end_to_end_and_validates_before_loading(tmp_path):
    from rewardlab.testing import make_random_checkpoint

    pipe = tiny_pipeline(tmp_path / "src", 0)
    pipe.save_pretrained(tmp_path / "pipe")
    reward = make_random_checkpoint(tmp_path / "reward.safetensors", seed=1)
    heldout = make_random_checkpoint(tmp_path / "heldout.safetensors", seed=2)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    runner = CliRunner()
    bad = runner.invoke(cli, ["finetune", "--model", "does/not/exist", "--prompts", str(tmp_path / "prompts.txt"),
                              "--set", "method=sgd"])
    assert bad.exit_code == 2 and "setting method: 'sgd' is not one of refl, draft, alignprop" in bad.output
    missing = runner.invoke(cli, ["finetune", "--model", "does/not/exist", "--prompts", str(tmp_path / "none.txt")])
    assert missing.exit_code == 1 and "none.txt: prompt file not found" in missing.output
    out = tmp_path / "run"
    result = runner.invoke(cli, ["finetune", "--method", "draft", "--model", str(tmp_path / "pipe"),
                                 "-r", f"{reward}:0.5", "-r", str(reward), "--heldout-reward", heldout,
                                 "-p", str(tmp_path / "prompts.txt"), "-o", str(out), "--set", "num_steps=4",
                                 "--set", "max_steps=2", "--set", "validation_guidance_scale=1",
                                 "--set", "validation_count=2", "--set", "cpu=true", "--set", "grad_scale=1"])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(set(r) >= {"reward", "reward/reward.safetensors", "reward/reward.safetensors#2", "heldout"}
               for r in steps)
    # weighted sum of the two terms (same model): total = 0.5 s + 1.0 s
    assert steps[0]["reward"] == pytest.approx(1.5 * steps[0]["reward/reward.safetensors#2"], rel=1e-5)
    end = log[-1]
    assert end["event"] == "end" and {"base_reward", "base_heldout", "valid_reward", "valid_heldout"} <= set(end)
    assert (out / "lora" / "final" / "pytorch_lora_weights.safetensors").is_file()
    page = (out / "gallery.html").read_text()
    assert "data:image/" in page and "base: step 0" in page and "now: step" in page
