
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from sagan.errors import ConfigError
from sagan.module import SAGAN


def _model(**kw) -> SAGAN:
    args = dict(resolution=32, img_channels=1, num_classes=4, z_dim=16, g_ch=8, d_ch=8)
    args.update(kw)
    return SAGAN(**args)


def _loader(n: int = 16, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 32, 32, generator=g) * 2 - 1
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _fit(model: SAGAN, max_steps: int, tmp_path) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, _loader())
    return trainer


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.named_parameters() if not torch.equal(before[k], v.detach())}


def test_discriminator_step_changes_d_but_not_g(tmp_path):
    torch.manual_seed(0)
    model = _model(n_dis=2)
    g0, d0 = _params(model.generator), _params(model.discriminator)
    _fit(model, max_steps=1, tmp_path=tmp_path)  # one optimizer step: a D step (n_dis=2, no G step yet)
    assert model.d_steps == 1 and model.g_steps == 0
    assert _changed(g0, model.generator) == set()
    # every D parameter moved, except the attention convs behind gamma = 0, which get no gradient yet
    expected = {k for k in d0 if not k.startswith("attn.") or k.endswith("gamma")}
    assert _changed(d0, model.discriminator) == expected


def test_generator_step_changes_g_but_not_d(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = _model(n_dis=1)
    seen = {}
    orig = SAGAN.g_step

    def spy(self, batch_size, *args):
        d_before, g_before = _params(self.discriminator), _params(self.generator)
        grads_before = [None if p.grad is None else p.grad.clone() for p in self.discriminator.parameters()]
        out = orig(self, batch_size, *args)
        seen["d_changed"] = _changed(d_before, self.discriminator)
        seen["g_changed"] = _changed(g_before, self.generator)
        seen["d_grads_same"] = all(
            (a is None and p.grad is None) or (a is not None and torch.equal(a, p.grad))
            for a, p in zip(grads_before, self.discriminator.parameters())
        )
        return out

    monkeypatch.setattr(SAGAN, "g_step", spy)
    _fit(model, max_steps=2, tmp_path=tmp_path)  # D step then G step
    assert model.d_steps == 1 and model.g_steps == 1
    assert seen["d_changed"] == set()
    g_names = set(_params(model.generator))
    assert seen["g_changed"] == {k for k in g_names if not k.startswith("attn.") or k.endswith("gamma")}
    assert seen["d_grads_same"]  # D's parameters were frozen: the G loss added no gradient to them


def test_n_dis_schedule_and_ema(tmp_path):
    torch.manual_seed(0)
    model = _model(n_dis=3, ema_decay=0.999)
    trainer = _fit(model, max_steps=8, tmp_path=tmp_path)  # 8 optimizer steps = 2 iterations of 3 D + 1 G
    assert trainer.global_step == 8
    assert model.d_steps == 6 and model.g_steps == 2
    # EMA: first update copies G, second blends with warm-up decay (1 + 1) / (10 + 1)
    assert int(model.g_ema.n_averaged) == 2
    ema = dict(model.g_ema.module.named_parameters())
    g = dict(model.generator.named_parameters())
    name = "linear.parametrizations.weight.original"
    assert not torch.equal(ema[name], g[name])


def test_ema_follows_warmup_formula():
    torch.manual_seed(0)
    model = _model()
    w = model.generator.linear.parametrizations.weight.original
    model.g_ema.update_parameters(model.generator)  # copy
    first = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    model.g_ema.update_parameters(model.generator)
    decay = 2.0 / 11.0
    expected = decay * first + (1 - decay) * w.detach()
    torch.testing.assert_close(model.g_ema.module.linear.parametrizations.weight.original, expected)


def test_ema_keeps_its_own_spectral_norm_vectors_one_power_iteration_per_update():
    """After the first update (a copy of G's), the EMA's SN vectors are its own: each update takes them one power
    iteration, as torch's training-mode forward runs it, against the averaged weights; G's vectors never leak in."""
    import copy

    torch.manual_seed(0)
    model = _model()
    model._update_ema()
    g_uv = {k: v for k, v in model.generator.named_buffers() if k.endswith(("._u", "._v"))}
    with torch.no_grad():
        for p in model.generator.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for v in g_uv.values():
            v.copy_(torch.nn.functional.normalize(torch.randn_like(v), dim=0))
    expected = copy.deepcopy(model.g_ema.module)
    model._update_ema()
    for name, w in model.g_ema.module.named_parameters():  # the reference: the averaged weights ...
        expected.get_parameter(name).data.copy_(w)
    for m in expected.modules():  # ... and one training-mode forward of each parametrisation, from the old vectors
        if hasattr(m, "parametrizations"):
            m.parametrizations.weight.train()
            _ = m.weight
    uv = {k: v for k, v in model.g_ema.module.named_buffers() if k.endswith(("._u", "._v"))}
    assert uv.keys() == g_uv.keys() and len(uv) > 10
    for k, v in expected.named_buffers():
        if k in uv:
            assert torch.equal(uv[k], v), k
            assert v.numel() == 1 or not torch.equal(uv[k], g_uv[k]), k  # a 1-vector is +-1 either way
        else:  # BatchNorm statistics: G's
            assert torch.equal(model.g_ema.module.get_buffer(k), model.generator.get_buffer(k)), k


def test_ema_update_count_stays_on_the_host_when_the_module_moves():
    """On a GPU, AveragedModel's reads of its count would each wait for the queued kernels: the count stays put."""
    model = _model()
    count = model.g_ema.n_averaged
    model.to("meta").double()
    assert model.g_ema.n_averaged is count and count.device.type == "cpu" and count.dtype == torch.long
    assert next(model.g_ema.parameters()).device.type == "meta"
    assert model.g_ema.state_dict()["n_averaged"].device.type == "cpu"


def _bn_input_stats(g: torch.nn.Module, n: int = 2048) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and variance of what each BatchNorm layer of ``g`` (in eval mode) receives over n samples."""
    bns = [m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen: dict[int, list] = {i: [] for i in range(len(bns))}
    hooks = [m.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach())) for i, m in enumerate(bns)]
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for _ in range(n // 256):
            g.eval()(torch.randn(256, g.z_dim, generator=gen), torch.randint(0, 4, (256,), generator=gen))
    for h in hooks:
        h.remove()
    return [(torch.cat(v).mean((0, 2, 3)), torch.cat(v).var((0, 2, 3))) for v in seen.values()]


def _bn_stats_match(g: torch.nn.Module) -> bool:
    bns = [m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return all(((m.running_mean - mean).abs() < 0.1 * var.sqrt()).all()
               and ((m.running_var / var).log().abs() < 0.2).all()
               for m, (mean, var) in zip(bns, _bn_input_stats(g), strict=True))


def test_ema_generator_runs_with_standing_statistics_of_its_own_weights(tmp_path):
    torch.manual_seed(0)
    model = _model()
    trainer = _fit(model, max_steps=4, tmp_path=tmp_path)
    torch.manual_seed(1)
    other = _model().generator  # EMA weights far from G's, so that G's statistics are clearly wrong for them
    with torch.no_grad():
        for a, b in zip(model.g_ema.module.parameters(), other.parameters(), strict=True):
            a.copy_(b)
    assert not _bn_stats_match(model.g_ema.module)  # G's running statistics, copied at each EMA update
    g = model.ema_generator()
    assert not g.training and _bn_stats_match(g)
    # the checkpoint holds the standing statistics, so `sagan evaluate` / `generate` load the same network
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)["state_dict"]
    for k, v in g.named_buffers():
        assert torch.equal(state[f"g_ema.module.{k}"], v), k
    off = _model(ema_bn_samples=0)
    before = {k: v.clone() for k, v in off.g_ema.module.named_buffers()}
    off.ema_generator()
    assert all(torch.equal(v, before[k]) for k, v in off.g_ema.module.named_buffers())


def test_standing_statistics_leave_training_unchanged_bit_for_bit(tmp_path):
    from sagan.callbacks import SampleGrid

    states = {}
    for n in (0, 1024):
        torch.manual_seed(0)
        model = _model(ema_bn_samples=n)
        trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[SampleGrid(str(tmp_path / f"grid{n}"), every_n_steps=1)])
        trainer.fit(model, _loader())  # a grid, and so a refresh, after every iteration
        states[n] = model.state_dict()
    refreshed = 0
    for k, v in states[0].items():
        if k.startswith("g_ema.module.") and k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            refreshed += not torch.equal(v, states[1024][k])
        else:
            assert torch.equal(v, states[1024][k]), k
    assert refreshed > 0


def test_fixed_sample_noise_rows_are_classes_and_persist():
    model = _model(num_classes=4, sample_per_class=3)
    assert model.sample_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    again = _model(num_classes=4, sample_per_class=3)
    assert torch.equal(model.sample_z, again.sample_z)  # same seed -> same noise
    assert "sample_z" in model.state_dict() and "sample_y" in model.state_dict()
    grid = model.sample_grid()
    assert grid.shape[0] == 3 and grid.min() >= 0 and grid.max() <= 1
    unconditional = _model(conditional=False, sample_num=16)
    assert unconditional.num_classes == 0 and unconditional.sample_z.shape == (16, 16)


def test_unconditional_training_ignores_labels(tmp_path):
    torch.manual_seed(0)
    model = _model(conditional=False)
    assert not hasattr(model.discriminator, "embed")
    _fit(model, max_steps=2, tmp_path=tmp_path)
    assert model.g_steps == 1


def test_checkpoint_roundtrip_keeps_counters_and_noise(tmp_path):
    torch.manual_seed(0)
    model = _model(n_dis=1)
    trainer = _fit(model, max_steps=4, tmp_path=tmp_path)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["sagan"]["g_steps"] == 2
    restored = SAGAN(**ckpt["hyper_parameters"])
    restored.load_state_dict(ckpt["state_dict"])
    restored.on_load_checkpoint(ckpt)
    assert restored.g_steps == 2 and restored.d_steps == 2
    assert torch.equal(restored.sample_z, model.sample_z)
    for (k, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), k


def _paper_iterations(model: SAGAN, batches: list, channels_last: bool, reuse_fakes: bool = False) -> None:
    """SAGAN's training iteration written out plainly (hinge loss, Adam, one D step then one G step with D's
    spectral-norm vectors held, then the EMA): what the module must do, bit for bit, when augmentation and LeCam
    are off. Batch k draws its latents from the stream seeded by (run seed, rank 0, k). ``reuse_fakes``: the G
    step trains on the D step's images (DCGAN's example), drawn once with their graph."""
    from sagan.checkpointing import run_seed, seed_step

    hp = model.hparams
    g, d = model.generator, model.discriminator
    if channels_last:
        for m in (g, d, model.g_ema):
            m.to(memory_format=torch.channels_last)
    opt_g = torch.optim.Adam(g.parameters(), lr=hp.lr_g, betas=tuple(hp.betas_g))
    opt_d = torch.optim.Adam(d.parameters(), lr=hp.lr_d, betas=tuple(hp.betas_d))
    for k, (x, y) in enumerate(batches):
        seed_step(run_seed(), 0, k)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        z, y_fake = torch.randn(len(x), hp.z_dim), torch.randint(0, model.num_classes, (len(x),))
        with torch.set_grad_enabled(reuse_fakes):
            fake = g(z, y_fake)
        logits = d(torch.cat([x, fake.detach()]), torch.cat([y, y_fake]))
        loss_d = torch.relu(1 - logits[: len(x)]).mean() + torch.relu(1 + logits[len(x):]).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        if not reuse_fakes:
            z, y_fake = torch.randn(len(x), hp.z_dim), torch.randint(0, model.num_classes, (len(x),))
            fake = g(z, y_fake)
        d.requires_grad_(False)
        d.eval()  # spectral-norm vectors of D move once per D step
        loss_g = -d(fake, y_fake).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        d.requires_grad_(True)
        d.train()
        model._update_ema()


@pytest.mark.parametrize("channels_last,reuse_fakes", [(False, False), (True, False), (True, True)])
def test_training_without_augmentation_or_lecam_is_the_plain_sagan_step_bit_for_bit(tmp_path, channels_last,
                                                                                    reuse_fakes):
    import copy

    torch.manual_seed(0)
    model = _model(n_dis=1, channels_last=channels_last, reuse_fakes=reuse_fakes)
    assert model.hparams.augment == "" and model.hparams.lecam_weight == 0.0  # the defaults: off
    reference = copy.deepcopy(model)
    loader = DataLoader(_loader().dataset, batch_size=4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, loader)
    assert model.g_steps == 3
    torch.manual_seed(1)
    _paper_iterations(reference, [next(it) for it in [iter(loader)] for _ in range(3)], channels_last, reuse_fakes)
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_augmentation_sees_every_image_d_sees_and_passes_gradients_to_g(tmp_path, monkeypatch):
    from sagan.augment import DiffAugment

    calls = []
    real_call = DiffAugment.__call__

    def spy(self, x):
        out = real_call(self, x)
        calls.append({"n": len(x), "grad": x.requires_grad, "changed": not torch.equal(out, x), "out": out})
        if x.requires_grad:
            out.register_hook(lambda g: calls[-1].update(grad_out=g.abs().sum().item()))
        return out

    monkeypatch.setattr(DiffAugment, "__call__", spy)
    torch.manual_seed(0)
    model = _model(n_dis=1, augment="color,translation,cutout")
    seen = {}
    orig_g_step = SAGAN.g_step

    def g_step(self, batch_size, *args):
        before = _params(self.generator)
        out = orig_g_step(self, batch_size, *args)
        seen["g_changed"] = _changed(before, self.generator)
        seen["grad"] = self.generator.linear.parametrizations.weight.original.grad
        return out

    monkeypatch.setattr(SAGAN, "g_step", g_step)
    _fit(model, max_steps=2, tmp_path=tmp_path)  # one D step, one G step
    d_call, g_call = calls
    assert d_call["n"] == 8 and not d_call["grad"] and d_call["changed"]  # real and fake batch, one policy
    assert g_call["n"] == 4 and g_call["grad"] and g_call["changed"]  # G's output, in the graph
    assert g_call["grad_out"] > 0  # D's gradient flowed back through the augmentation ...
    assert seen["grad"] is not None and seen["grad"].abs().sum() > 0 and seen["g_changed"]  # ... into G


def test_transitional_conditioning_ramps_the_class_signal(tmp_path):
    from sagan.layers import ConditionalBatchNorm2d

    torch.manual_seed(0)
    model = _model(n_dis=1, cond_ramp=(2, 6))
    for it, expected in ((0, 0.0), (1, 0.0), (2, 0.0), (4, 0.5), (6, 1.0), (9, 1.0)):
        model._set_cond_strength(it)
        for m in (model.generator, model.discriminator, model.g_ema.module):
            assert m.cond_strength == pytest.approx(expected)
    g, d = model.generator.eval(), model.discriminator.eval()
    with torch.no_grad():  # classes that training has made different
        for m in g.modules():
            if isinstance(m, ConditionalBatchNorm2d):
                m.gain.weight.add_(0.3 * torch.randn_like(m.gain.weight))
                m.bias.weight.add_(0.3 * torch.randn_like(m.bias.weight))
    z = torch.randn(1, 16).repeat(2, 1)
    labels = torch.tensor([0, 3])
    model._set_cond_strength(0)
    img = g(z, labels)
    torch.testing.assert_close(img[0], img[1])  # strength 0: the class makes no difference ...
    out = d(img, labels)
    torch.testing.assert_close(out[0], out[1])
    model._set_cond_strength(6)
    assert not torch.allclose(*g(z, labels))  # ... strength 1: it does
    assert all(torch.is_tensor(v) for v in model.state_dict().values())  # nothing but tensors in the state dict
    trainer = _fit(_model(n_dis=1, cond_ramp=(1, 3)), max_steps=8, tmp_path=tmp_path)
    assert trainer.lightning_module.generator.cond_strength == 1.0  # 4 iterations: ramp done
    # a checkpoint taken mid-transition is evaluated (and resumed) at the strength it was trained with
    from sagan.sampling import generator_from_checkpoint

    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "sagan": {"g_steps": 4}}
    assert generator_from_checkpoint(ckpt).cond_strength == 0.5
    fresh = _model(n_dis=1, cond_ramp=(2, 6))
    fresh.on_load_checkpoint(ckpt)
    assert fresh.generator.cond_strength == fresh.g_ema.module.cond_strength == fresh.discriminator.cond_strength == 0.5


def test_mode_seeking_pairs_the_classes_of_the_generator_step(tmp_path):
    torch.manual_seed(0)
    model = _model(n_dis=1, mode_seeking=1.0)
    seen = []
    g_forward = model.generator.forward

    def spy(z, y=None):
        if torch.is_grad_enabled():  # the G step (the D step runs G under no_grad)
            seen.append(y.clone())
        return g_forward(z, y)

    model.generator.forward = spy
    trainer = _fit(model, max_steps=4, tmp_path=tmp_path)
    assert len(seen) == 2
    for y in seen:
        assert torch.equal(y[:2], y[2:4])  # batch 4: (0, 2) and (1, 3) are pairs of one class
    assert "train/mode_seeking" in trainer.callback_metrics


def test_match_real_mode_seeking_tracks_real_distance_in_d_features_and_charges_g(tmp_path, monkeypatch):
    import sagan.module
    from sagan.losses import same_class_distance

    torch.manual_seed(0)
    model = _model(n_dis=1, mode_seeking=2.0, mode_seeking_form="match_real")
    seen = []
    d_forward = model.discriminator.forward

    def spy(x, y=None, return_features=False):
        out = d_forward(x, y, return_features)
        if return_features and model.discriminator.training:  # the D step: real images are the first half
            b = x.shape[0] // 2
            seen.append(same_class_distance(out[1][:b], y[:b]))
        return out

    model.discriminator.forward = spy
    g_losses = []
    g_step = model.g_step
    model.g_step = lambda batch_size, *a: g_losses.append(g_step(batch_size, *a)) or g_losses[-1]
    monkeypatch.setattr(sagan.module, "diversity_match_reg", lambda feats, target: feats.sum() * 0 + 1000.0)
    _fit(model, max_steps=6, tmp_path=tmp_path)
    seen = [d for d in seen if not d.isnan()]
    assert seen, "the test batches must hold same-class pairs"
    expected = seen[0]
    for d in seen[1:]:
        expected = 0.99 * expected + 0.01 * d
    torch.testing.assert_close(model.real_pair_distance, expected)
    for out in g_losses:  # the regulariser enters G's loss with its weight
        assert out["mode_seeking"] == 1000.0 and 1990.0 < out["loss_g"] < 2010.0


def test_auxiliary_classifier_learns_real_classes_in_d_and_charges_g_for_its_samples(tmp_path, monkeypatch):
    import sagan.module

    torch.manual_seed(0)
    model = _model(n_dis=1, class_weight=0.5)
    assert model.discriminator.classifier is not None and _model().discriminator.classifier is None
    calls = []  # (D in training mode?, logits, targets) of every cross-entropy the steps take
    real_ce = torch.nn.functional.cross_entropy

    def spy(logits, target):
        calls.append((model.discriminator.training, logits, target))
        return real_ce(logits, target) * 0 + 1000.0

    monkeypatch.setattr(sagan.module.F, "cross_entropy", spy)
    batches, d_outs, g_labels = [], [], []
    d_step = model.d_step
    model.d_step = lambda x, y, *a: batches.append(y.clone()) or d_step(x, y, *a)
    d_forward = model.discriminator.forward

    def d_spy(x, y=None, return_features=False):
        out = d_forward(x, y, return_features)
        if model.discriminator.training:
            d_outs.append(out)
        else:  # G's step: the labels G was asked for
            g_labels.append(y.clone())
        return out

    model.discriminator.forward = d_spy
    g_logs = []
    g_step = model.g_step
    model.g_step = lambda batch_size, *a: g_logs.append(g_step(batch_size, *a)) or g_logs[-1]
    _fit(model, max_steps=4, tmp_path=tmp_path)  # two D steps and two G steps
    d_calls = [c for c in calls if c[0]]
    g_calls = [c for c in calls if not c[0]]
    assert len(d_calls) == 2 and len(g_calls) == 2
    for (_, logits, target), y, out in zip(d_calls, batches, d_outs):  # D: real half only, the data's labels
        assert torch.equal(logits, out.class_logits[: len(y)]) and torch.equal(target, y)
    for (_, logits, target), out, y in zip(g_calls, g_logs, g_labels):  # G: its samples, the labels it asked for
        assert logits.shape == (4, 4) and logits.requires_grad and torch.equal(target, y)
        assert out["class_g"] == 1000.0 and 490.0 < out["loss_g"] < 510.0  # enters G's loss with its weight


def test_twin_classifier_learns_generated_classes_and_g_pays_the_difference(tmp_path, monkeypatch):
    """TAC-GAN: D's twin head learns the classes of the generated half of D's batch; G's class term is the
    auxiliary classifier's cross-entropy minus the twin's."""
    import sagan.module

    torch.manual_seed(0)
    model = _model(n_dis=1, class_weight=0.5, class_twin=True)
    assert model.discriminator.twin_classifier is not None
    assert _model(class_weight=0.5).discriminator.twin_classifier is None
    outs = []  # (D in training mode?, DOutput, labels) of every D forward
    d_forward = model.discriminator.forward

    def d_spy(x, y=None, return_features=False):
        out = d_forward(x, y, return_features)
        outs.append((model.discriminator.training, out, y.clone()))
        return out

    model.discriminator.forward = d_spy
    calls = []  # (which head, in training mode?, target)
    real_ce = torch.nn.functional.cross_entropy

    def spy(logits, target):
        training, out, _ = outs[-1]
        n = logits.shape[0]
        head = ("twin" if any(torch.equal(logits, t) for t in (out.twin_logits, out.twin_logits[-n:]))
                else "aux" if any(torch.equal(logits, t) for t in (out.class_logits, out.class_logits[:n])) else "?")
        calls.append((head, training, target.clone()))
        return real_ce(logits, target) * 0 + (400.0 if head == "twin" else 1000.0)

    monkeypatch.setattr(sagan.module.F, "cross_entropy", spy)
    logs = []
    d_step, g_step = model.d_step, model.g_step
    model.d_step = lambda x, y, *a: logs.append(("d", d_step(x, y, *a))) or logs[-1][1]
    model.g_step = lambda batch_size, *a: logs.append(("g", g_step(batch_size, *a))) or logs[-1][1]
    _fit(model, max_steps=4, tmp_path=tmp_path)  # two D steps and two G steps
    assert [(h, t) for h, t, _ in calls] == [("aux", True), ("twin", True), ("aux", False), ("twin", False)] * 2
    d_labels = [y for training, _, y in outs if training]
    for (_, _, target), y in zip([c for c in calls if c[0] == "twin" and c[1]], d_labels):
        assert torch.equal(target, y[len(y) // 2 :])  # the twin learns the generated half's labels
    for kind, out in logs:
        if kind == "d":  # both heads enter D's loss with the class weight: 0.5 * (1000 + 400) + hinge
            assert out["class_twin_d"] == 400.0 and 695.0 < out["loss_d"] < 710.0
        else:  # G: 0.5 * (1000 - 400) + its adversarial loss
            assert out["class_twin_g"] == 400.0 and 290.0 < out["loss_g"] < 310.0
    with pytest.raises(ConfigError, match="model.class_twin needs the auxiliary classifier"):
        _model(class_twin=True)


def test_auxiliary_classifier_needs_classes(tmp_path):
    """On an unconditional model (``--model.conditional false`` on the demo's recipe) and on data without classes
    (the recipe pointed at a flat folder), it is off like the conditioning itself, with a warning, and training
    runs."""
    with pytest.warns(UserWarning, match="model.class_weight is ignored: the model is unconditional"):
        model = _model(conditional=False, class_weight=1.0)
    assert model.class_weight == 0.0 and model.num_classes == 0
    with pytest.warns(UserWarning, match="model.class_weight is ignored: the data has no classes"):
        model = _model(num_classes=0, class_weight=1.0)
    assert model.class_weight == 0.0 and model.num_classes == 0
    assert not any("classifier" in name for name, _ in model.discriminator.named_parameters())
    trainer = _fit(model, max_steps=2, tmp_path=tmp_path)  # a D step and a G step, labels ignored
    assert "train/loss_g" in trainer.callback_metrics and "train/class_d" not in trainer.callback_metrics


class _Recorder(pl.loggers.logger.Logger):
    """A logger that keeps what Lightning writes: {step: {name: value}}."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.setdefault(int(step), {}).update(metrics)


def _logged_run(tmp_path, every: int, monkeypatch=None) -> tuple[dict, int, pl.Trainer]:
    pl.seed_everything(0)
    model = _model(mode_seeking=0.5)
    calls = []
    log_dict = model.log_dict
    model.log_dict = lambda *a, **k: (calls.append(1), log_dict(*a, **k))[1]
    rec = _Recorder()
    trainer = pl.Trainer(accelerator="cpu", max_steps=14, logger=rec, log_every_n_steps=every,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, _loader(n=64))
    rows = {s: {k: v for k, v in r.items() if k != "train/images_per_s"} for s, r in rec.rows.items()}
    return rows, len(calls), trainer


def test_logging_only_on_logged_batches_writes_the_same_values(tmp_path, monkeypatch):
    """The step logs its values only on the batches whose values reach the loggers (and the first and last):
    what the loggers receive is the same as when every batch logs, and most batches make no log calls."""
    rows, calls, trainer = _logged_run(tmp_path, every=3)
    monkeypatch.setattr(SAGAN, "_logs_this_batch", lambda self: True)
    rows_all, calls_all, _ = _logged_run(tmp_path, every=3)
    assert rows and rows == rows_all
    assert sum("train/loss_d" in r for r in rows.values()) == 7 // 3  # 7 batches (14 optimizer steps)
    assert calls * 7 == calls_all * 4  # batches 1 (the first), 3, 6 and 7 (the last) of 7 log
    assert "train/loss_g" in trainer.callback_metrics  # the last batch's values, for the progress bar


def test_hierarchical_latent_checkpoints_rebuild_the_same_generator(tmp_path):
    from sagan.errors import CheckpointError
    from sagan.sampling import generator_from_checkpoint

    torch.manual_seed(0)
    model = _model(n_dis=1, skip_z=True)
    _fit(model, max_steps=4, tmp_path=tmp_path)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    g = generator_from_checkpoint(ckpt)
    assert len(g.z_chunks) == 4
    z, y = torch.randn(3, 16), torch.tensor([0, 1, 3])
    model.g_ema.module.eval()
    torch.testing.assert_close(g(z, y), model.g_ema.module(z, y))
    with pytest.raises(CheckpointError, match="skip_z=True in the checkpoint vs False here"):
        _model(n_dis=1).on_load_checkpoint(ckpt)


def test_minibatch_stddev_trains_and_checks_the_batch_size(tmp_path):
    """model.mbstd_group: D gets the extra channel and trains; a batch size that is not a multiple of the group is
    one clear error at the start of fit, before any step."""
    torch.manual_seed(0)
    model = _model(mbstd_group=2)
    d0 = _params(model.discriminator)
    _fit(model, max_steps=2, tmp_path=tmp_path)
    assert model.g_steps == 1 and _changed(d0, model.discriminator)

    class Data(pl.LightningDataModule):
        batch_size = 4

        def train_dataloader(self) -> DataLoader:
            return _loader(batch=4)

    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    model = _model(mbstd_group=3)
    with pytest.raises(ConfigError, match=r"model.mbstd_group=3 needs data.batch_size to be a multiple of it, got 4"):
        trainer.fit(model, datamodule=Data())
    assert model.d_steps == 0
    with pytest.raises(ConfigError, match="model.mbstd_group must be >= 0"):
        _model(mbstd_group=-1)


@pytest.mark.parametrize("n_dis", [1, 2])
def test_reuse_fakes_runs_g_once_per_iteration_fewer(tmp_path, monkeypatch, n_dis):
    """reuse_fakes: the G step trains on exactly the images the D step before it showed D (with mode seeking's
    same-class pairs), so each iteration runs G forward once fewer; the other D steps of n_dis draw as before."""
    from sagan.models import Generator

    seen = {"g_forwards": 0, "d_fakes": [], "g_fakes": []}
    real_forward = Generator.forward

    def count(self, *args, **kwargs):
        seen["g_forwards"] += self is model.generator
        return real_forward(self, *args, **kwargs)

    orig_d, orig_g = SAGAN.d_step, SAGAN.g_step

    def d_step(self, x, y, drawn=None):
        seen["d_fakes"].append(None if drawn is None else drawn[2].detach().clone())
        return orig_d(self, x, y, drawn)

    def g_step(self, batch_size, drawn=None):
        assert drawn is not None and drawn[2].requires_grad  # G's graph reaches the G step
        assert torch.equal(drawn[1][:2], drawn[1][2:4])  # mode seeking's pairs: the same classes
        seen["g_fakes"].append(drawn[2].detach().clone())
        return orig_g(self, batch_size, drawn)

    monkeypatch.setattr(Generator, "forward", count)
    monkeypatch.setattr(SAGAN, "d_step", d_step)
    monkeypatch.setattr(SAGAN, "g_step", g_step)
    torch.manual_seed(0)
    model = _model(n_dis=n_dis, reuse_fakes=True, mode_seeking=0.3)
    _fit(model, max_steps=3 * (n_dis + 1), tmp_path=tmp_path)  # 3 iterations
    assert model.g_steps == 3 and model.d_steps == 3 * n_dis
    assert seen["g_forwards"] == 3 * n_dis  # fresh: 3 * (n_dis + 1)
    reused = [f for f in seen["d_fakes"] if f is not None]
    assert len(reused) == 3 and all(torch.equal(a, b) for a, b in zip(reused, seen["g_fakes"]))
    assert seen["d_fakes"][: n_dis - 1] == [None] * (n_dis - 1)


class _CountedData(pl.LightningDataModule):
    """The 16 images of ``_loader`` with class counts of the data module's choosing (None: like plain loaders)."""

    def __init__(self, counts: list[int] | None) -> None:
        super().__init__()
        self.counts = counts

    def class_counts(self, split: str = "train") -> torch.Tensor | None:
        return None if self.counts is None else torch.tensor(self.counts)

    def train_dataloader(self) -> DataLoader:
        return _loader()


@pytest.mark.parametrize("fake_labels", ["data", "auto"])
def test_fake_labels_data_asks_g_for_each_class_at_its_training_frequency(tmp_path, fake_labels):
    """``fake_labels`` 'data' (and the default 'auto' where the data module counts classes): the prior is the data
    module's class frequencies, G's labels in both steps and in the standing statistics follow it (a class without
    images is never asked for); 'auto' with plain data loaders is 'uniform'."""
    assert _model().hparams.fake_labels == "auto"
    plain = _model(n_dis=1)
    _fit(plain, max_steps=2, tmp_path=tmp_path)
    assert not plain.labels_from_data and plain.fake_label_prior.tolist() == [0.25] * 4
    torch.manual_seed(0)
    model = _model(n_dis=1, fake_labels=fake_labels)
    asked = []
    g_forward, ema_forward = model.generator.forward, model.g_ema.module.forward
    model.generator.forward = lambda z, y=None: (asked.append(y.clone()), g_forward(z, y))[1]
    model.g_ema.module.forward = lambda z, y=None: (asked.append(y.clone()), ema_forward(z, y))[1]
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=_CountedData([8, 4, 0, 4]))
    assert model.fake_label_prior.tolist() == [0.5, 0.25, 0.0, 0.25]
    model.ema_generator()  # the standing statistics of the EMA generator
    labels = torch.cat(asked)
    assert len(labels) >= 6 * 4 + 1024 and 2 not in labels.tolist()
    freq = torch.bincount(model._fake_labels(40_000), minlength=4).double() / 40_000
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.0, 0.25], dtype=torch.float64), atol=0.01)
    # the prior travels in the checkpoint; checkpoints from before it load with the uniform one
    state = model.state_dict()
    assert torch.equal(state["fake_label_prior"], model.fake_label_prior)
    fresh = _model(n_dis=1)
    old = {"state_dict": {k: v for k, v in state.items() if k != "fake_label_prior"},
           "hyper_parameters": dict(fresh.hparams)}
    fresh.on_load_checkpoint(old)
    assert old["state_dict"]["fake_label_prior"].tolist() == [0.25] * 4


@pytest.mark.parametrize("counts, found", [(None, "no class counts"), ([3, 3], "2 classes, 6 images"),
                                           ([0, 0, 0, 0], "4 classes, 0 images")])
def test_fake_labels_data_without_class_counts_is_one_clear_error(tmp_path, counts, found):
    model = _model(fake_labels="data")
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match=f"model.fake_labels 'data'.*{found}.*fake_labels uniform"):
        trainer.fit(model, datamodule=_CountedData(counts))
    with pytest.raises(ConfigError, match="must be 'auto', 'data' or 'uniform'"):
        _model(fake_labels="classes")
