"""Fine-tuning: STU-Net's deep supervision, pretrained weights into a new network, the nnU-Net trainers.

Weights files are fabricated as the published ``.model`` (tests/fabricate.py), nnU-Net v2
``.pth`` (tests/model_folders.py) and ``.safetensors`` files. The trainers are built by hand on a
plan written by ``write_v2_folder`` and never looked up by name (nnU-Net's lookup imports every
trainer module it has, torchvision's among them).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import pytest
import torch
from fabricate import random_state_dict, shaped_state_dict, write_checkpoint
from model_folders import state_dict_of, v2_checkpoint, write_v2_folder
from safetensors.torch import save_file

from stuseg.errors import InputError, WeightsError
from stuseg.finetune.weights import HEADS, IMAGE_CONVS, load_pretrained
from stuseg.model.network import SIZES, Arch, STUNet

TINY = (4, 4, 8, 8, 8, 8)
STRIDES = ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))  # divisor (8, 32, 32)
PLAN_STRIDES = ((1, 1, 1), *STRIDES)  # as an nnU-Net v2 plan lists them


def _tiny(num_classes: int = 3, in_channels: int = 1, seed: int = 0) -> STUNet:
    torch.manual_seed(seed)
    arch = Arch(dims=TINY, depths=(1,) * 6, strides=STRIDES, in_channels=in_channels, num_classes=num_classes)
    return STUNet(arch).eval()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _previous_forward(net: STUNet, x: torch.Tensor) -> torch.Tensor:
    """STUNet.forward as it was before deep supervision existed (the inference path)."""
    skips = []
    for stage in net.conv_blocks_context[:-1]:
        x = stage(x)
        skips.append(x)
    x = net.conv_blocks_context[-1](x)
    for up, block in zip(net.upsample_layers, net.conv_blocks_localization):
        x = block(torch.cat((up(x), skips.pop()), dim=1))
    return net.seg_outputs[-1](x)


# ------------------------------------------------------------------------------ deep supervision


def test_deep_supervision_gives_every_decoder_level_highest_resolution_first() -> None:
    net = _tiny()
    x = torch.randn(2, 1, 16, 64, 64, generator=torch.Generator().manual_seed(1))
    levels: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: levels.append(o)) for b in net.conv_blocks_localization]
    net.deep_supervision = True
    with torch.no_grad():
        outputs = net(x)
    for h in hooks:
        h.remove()
    assert isinstance(outputs, list) and len(outputs) == 5
    # Output i has the resolution of encoder stage i: the input over the first i strides.
    expected = [(16, 64, 64), (16, 32, 32), (8, 16, 16), (4, 8, 8), (2, 4, 4)]
    assert [tuple(o.shape) for o in outputs] == [(2, 3, *s) for s in expected]
    # Each from its own decoder level (levels run coarsest first) through that level's head.
    with torch.no_grad():
        for i, out in enumerate(outputs):
            assert _same_bits(out, net.seg_outputs[4 - i](levels[4 - i]))


def test_without_deep_supervision_the_forward_pass_is_unchanged_bit_for_bit() -> None:
    net = _tiny()
    x = torch.randn(1, 1, 16, 64, 64, generator=torch.Generator().manual_seed(2))
    assert net.deep_supervision is False
    with torch.no_grad():
        plain = net(x)
        before = _previous_forward(net, x)
        net.deep_supervision = True
        full_resolution = net(x)[0]
    assert isinstance(plain, torch.Tensor)
    assert _same_bits(plain, before)
    assert _same_bits(full_resolution, plain)
    # The flag is no tensor: published checkpoints still load strictly.
    assert "deep_supervision" not in " ".join(net.state_dict())
    net.load_state_dict(_tiny(seed=5).state_dict(), strict=True)


def test_deep_supervision_checks_the_input_shape() -> None:
    net = _tiny()
    net.deep_supervision = True
    with pytest.raises(ValueError, match=r"\(8, 32, 16\) must be divisible by \(8, 32, 32\)"):
        net(torch.zeros(1, 1, 8, 32, 16))


# ------------------------------------------------------------------------------ pretrained weights


@pytest.fixture(scope="module")
def published_small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A published-style nnU-Net v1 ``.model`` of STU-Net small with the 105 TotalSegmentator classes."""
    state = random_state_dict("small", seed=3)
    path = write_checkpoint(tmp_path_factory.mktemp("published") / "small_ep4k.model", state)
    return path, state


def _small(num_classes: int = 4, in_channels: int = 1) -> STUNet:
    torch.manual_seed(7)
    small = SIZES["small"]
    return STUNet(
        Arch(dims=small.dims, depths=small.depths, in_channels=in_channels, num_classes=num_classes)
    )


def test_published_weights_load_into_a_network_with_new_classes(
    published_small: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, state = published_small
    net = _small(num_classes=4)
    heads_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(HEADS)}

    report = load_pretrained(net, path)

    own = net.state_dict()
    body = [k for k in own if not k.startswith(HEADS)]
    assert all(_same_bits(own[k], state[k]) for k in body)
    heads = sorted(heads_before)
    assert len(heads) == 10  # 5 heads, weight and bias
    for k in heads:
        assert own[k].shape[0] == 4 and state[k].shape[0] == 105
        assert _same_bits(own[k], heads_before[k])  # left as the network initialised them
    assert report.path == path
    assert report.size == "small"
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report.keys_loaded == tuple(body)
    assert sorted(report.keys_reinitialised) == heads
    assert report.keys_repeated_over_channels == ()


def test_a_two_channel_network_gets_the_image_convolutions_repeated(
    published_small: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, state = published_small
    net = _small(in_channels=2)
    report = load_pretrained(net, path)
    own = net.state_dict()
    assert report.keys_repeated_over_channels == IMAGE_CONVS
    for key in IMAGE_CONVS:
        assert state[key].shape[1] == 1 and own[key].shape[1] == 2
        for channel in range(2):
            assert _same_bits(own[key][:, channel : channel + 1], state[key])
    others = [k for k in own if not k.startswith(HEADS) and k not in IMAGE_CONVS]
    assert all(_same_bits(own[k], state[k]) for k in others)


def test_v2_and_safetensors_files_with_wrapper_prefixes(tmp_path: Path) -> None:
    source = _tiny(num_classes=7, seed=11).state_dict()
    pth = tmp_path / "checkpoint_final.pth"
    ckpt = v2_checkpoint(
        source,
        plans={"dataset_name": "Dataset123_X"},
        dataset_json={"labels": {"background": 0}},
        configuration="3d_fullres",
        fold="0",
        trainer="STUNetTrainer_base",
        mirror_axes=(0, 1, 2),
        prefix="module.",
    )
    torch.save(ckpt, pth)
    st = tmp_path / "weights.safetensors"
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in source.items()}, str(st))
    for path in (pth, st):
        net = _tiny(num_classes=3)
        report = load_pretrained(net, path)
        own = net.state_dict()
        assert all(_same_bits(own[k], source[k]) for k in report.keys_loaded)
        assert len(report.keys_loaded) == len([k for k in own if not k.startswith(HEADS)])


def _refusal(tmp_path: Path, state: dict[str, torch.Tensor], net: STUNet | None = None) -> tuple[str, Path]:
    path = write_checkpoint(tmp_path / "given.model", state)
    net = net if net is not None else _tiny()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_pretrained(net, path)
    # Nothing was copied before the refusal.
    assert all(_same_bits(v, before[k]) for k, v in net.state_dict().items())
    message = str(info.value)
    assert "\n" not in message
    return message, path


def test_weights_of_another_size_are_refused_in_one_line(tmp_path: Path) -> None:
    message, path = _refusal(tmp_path, shaped_state_dict("base"), _small())
    assert message == (
        f"{path} holds STU-Net base weights but the network is STU-Net small; "
        "give small weights or fine-tune the base size"
    )


def test_missing_extra_and_misshapen_tensors_are_refused(tmp_path: Path) -> None:
    state = _tiny(seed=1).state_dict()
    custom = "custom (widths [4, 4, 8, 8, 8, 8], blocks [1, 1, 1, 1, 1, 1])"

    missing = dict(state)
    for key in ("conv_blocks_context.1.0.norm1.bias", "upsample_layers.0.conv.weight"):
        del missing[key]
    message, path = _refusal(tmp_path, missing)
    assert message == (
        f"{path} lacks 2 tensors of the STU-Net {custom} network: "
        "conv_blocks_context.1.0.norm1.bias, upsample_layers.0.conv.weight"
    )

    extra = {**state, **{f"conv_blocks_context.2.0.extra{i}.weight": torch.zeros(3) for i in range(4)}}
    message, path = _refusal(tmp_path, extra)
    assert message == (
        f"{path} has 4 tensors that the STU-Net {custom} network does not: "
        "conv_blocks_context.2.0.extra0.weight, conv_blocks_context.2.0.extra1.weight, "
        "conv_blocks_context.2.0.extra2.weight and 1 more"
    )

    misshapen = {**state, "conv_blocks_context.3.0.norm2.weight": torch.zeros(9)}
    message, path = _refusal(tmp_path, misshapen)
    assert message == (
        f"{path} has 1 tensor unlike the network's: conv_blocks_context.3.0.norm2.weight [9] (expected [8])"
    )

    doubles = {k: v.double() for k, v in state.items()}
    message, path = _refusal(tmp_path, doubles)
    assert message.startswith(
        f"{path} has {len([k for k in state if not k.startswith(HEADS)])} tensors unlike the network's: "
        "conv_blocks_context.0.0.conv1.weight float64 (expected float32), "
    )


def test_input_channels_other_than_one_must_match(tmp_path: Path) -> None:
    message, path = _refusal(tmp_path, _tiny(in_channels=2).state_dict(), _tiny(in_channels=3))
    assert message == (
        f"{path} is for 2 input channels and the network takes 3; "
        "weights for 1 channel are repeated over any number of channels, others must match"
    )
    net = _tiny(in_channels=2)
    load_pretrained(net, write_checkpoint(tmp_path / "two.model", _tiny(in_channels=2, seed=4).state_dict()))

    flat = {**_tiny().state_dict(), IMAGE_CONVS[0]: torch.zeros(4, 1, 1, 1, 1)}
    message, path = _refusal(tmp_path, flat, _tiny(in_channels=2))
    assert message == (
        f"{path} has 1 tensor unlike the network's: "
        f"{IMAGE_CONVS[0]} [4, 1, 1, 1, 1] (expected [4, 2, 3, 3, 3])"
    )
    message, path = _refusal(tmp_path, {**_tiny().state_dict(), IMAGE_CONVS[0]: torch.zeros(4)})
    assert message == (
        f"{path} has 1 tensor unlike the network's: {IMAGE_CONVS[0]} [4] (expected [4, 1, 3, 3, 3])"
    )


def test_files_without_stu_net_weights_are_refused(tmp_path: Path) -> None:
    message, path = _refusal(tmp_path, {"encoder.0.weight": torch.zeros(2)})
    assert message == (
        f"{path} does not hold STU-Net weights: it has no tensor conv_blocks_context.0.0.conv1.weight "
        "(its first tensor is encoder.0.weight)"
    )
    other = tmp_path / "log.pth"
    torch.save({"current_epoch": 3, "logging": {}}, other)
    with pytest.raises(WeightsError) as info:
        load_pretrained(_tiny(), other)
    assert str(info.value) == (
        f"{other} holds no network weights: stuseg reads an nnU-Net v2 checkpoint's 'network_weights', "
        "a v1 .model's 'state_dict', a state dict or a .safetensors file"
    )
    with pytest.raises(WeightsError, match="does not exist"):
        load_pretrained(_tiny(), tmp_path / "absent.model")


# ------------------------------------------------------------------------------ the trainers


@pytest.fixture
def v2_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict, Path]:
    """nnU-Net's folders in tmp_path, a 1-channel 3-class plan (patch 16x64x64), its preprocessed folder."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    folder = write_v2_folder(
        tmp_path / "model", state_dict_of(Arch(dims=TINY, depths=(1,) * 6)), patch_size=(16, 64, 64)
    )
    plans = json.loads((folder / "plans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    # The trainer infers the dataset format from the preprocessed files' endings.
    data = tmp_path / "nnUNet_preprocessed" / plans["dataset_name"] / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True)
    (data / "case_000.b2nd").touch()
    return plans, dataset_json, tmp_path / "nnUNet_results"


def test_the_small_trainer_builds_stu_net_small_with_pretrained_weights(
    v2_plan: tuple[dict, dict, Path], published_small: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from stuseg.finetune.trainer import STUNetTrainer, STUNetTrainer_base, STUNetTrainer_small

    plans, dataset_json, results = v2_plan
    path, state = published_small
    trainer = STUNetTrainer_small(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    assert trainer.initial_lr == STUNetTrainer.FINETUNE_LR == 1e-3
    assert trainer.from_scratch and trainer.weights_report is None
    trainer.pretrained = path
    assert not trainer.from_scratch
    trainer.initialize()

    net = trainer.network
    assert type(net) is STUNet
    assert (net.arch.dims, net.arch.depths) == (SIZES["small"].dims, SIZES["small"].depths)
    assert (net.arch.in_channels, net.arch.num_classes, net.arch.strides) == (1, 3, STRIDES)
    assert net.deep_supervision is True
    own = net.state_dict()
    report = trainer.weights_report
    assert report is not None and report.path == path and len(report.keys_reinitialised) == 10
    assert all(_same_bits(own[k], state[k]) for k in report.keys_loaded)
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 1e-3
    log = Path(trainer.log_file).read_text()
    assert (
        f"STU-Net small: loaded {len(report.keys_loaded)} tensors from {path} (sha256 {report.sha256})" in log
    )
    assert str(results) in trainer.output_folder and "STUNetTrainer_small__nnUNetPlans__3d_fullres" in (
        trainer.output_folder
    )
    with pytest.raises(WeightsError, match="before the trainer is initialised"):
        trainer.pretrained = path

    # Deep-supervision scales in the order and at the resolutions of the network's outputs.
    x = torch.randn(1, 1, 16, 64, 64)
    scales = trainer._get_deep_supervision_scales()
    with torch.no_grad():
        outputs = net(x)
        assert [list(o.shape[2:]) for o in outputs] == [
            [round(16 * a), round(64 * b), round(64 * c)] for a, b, c in scales
        ]
        trainer.set_deep_supervision_enabled(False)
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (1, 3, 16, 64, 64)

    # nnU-Net looks at the bound method's signature, and its predictor calls the class.
    assert "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters
    pm = PlansManager(plans)
    with torch.device("meta"):
        base = STUNetTrainer_base.build_network_architecture(
            pm, pm.get_configuration("3d_fullres"), 2, 5, enable_deep_supervision=False
        )
    assert base.arch.dims == SIZES["base"].dims and (base.arch.in_channels, base.arch.num_classes) == (2, 5)
    assert base.deep_supervision is False


def test_without_weights_the_trainer_trains_from_scratch(v2_plan: tuple[dict, dict, Path]) -> None:
    from stuseg.finetune.trainer import STUNetTrainer_small

    plans, dataset_json, _ = v2_plan
    trainer = STUNetTrainer_small(plans, "3d_fullres", "all", dataset_json, torch.device("cpu"))
    trainer.initial_lr = trainer.SCRATCH_LR
    trainer.initialize()
    assert trainer.from_scratch and trainer.weights_report is None
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 1e-2
    assert "no pretrained weights" in Path(trainer.log_file).read_text()

    # One step of nnU-Net's training: its deep-supervision loss takes the network's outputs as they come.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 16, 64, 64, generator=gen)
    seg = torch.randint(0, 3, (2, 1, 16, 64, 64), generator=gen).float()
    sizes = [
        [round(n * f) for n, f in zip(seg.shape[2:], scale)]
        for scale in trainer._get_deep_supervision_scales()
    ]
    targets = [torch.nn.functional.interpolate(seg, size=size, mode="nearest") for size in sizes]
    heads = trainer.network.seg_outputs
    before = [h.weight.detach().clone() for h in heads]
    trainer.network.train()
    loss = trainer.train_step({"data": x, "target": targets})["loss"]
    assert torch.isfinite(torch.as_tensor(loss))
    # nnU-Net weighs the outputs 1, 1/2, 1/4, 1/8 and 0 in the order given: the full-resolution head
    # learns, the coarsest (last) gets no gradient at all.
    assert not torch.equal(before[-1], heads[-1].weight)
    assert torch.equal(before[0], heads[0].weight)


def test_stu_net_strides_from_plans_of_any_depth(v2_plan: tuple[dict, dict, Path]) -> None:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from stuseg.finetune.trainer import plan_strides

    plans, _, _ = v2_plan
    pm = PlansManager(plans)
    assert plan_strides(pm.get_configuration("3d_fullres")) == STRIDES
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["strides"] = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    assert plan_strides(PlansManager(plans).get_configuration("3d_fullres")) == (
        (2, 2, 2),
        (2, 2, 2),
        (1, 1, 1),
        (1, 1, 1),
        (1, 1, 1),
    )
    arch["strides"] = [[1, 1, 1], *[[2, 2, 2]] * 7]
    assert plan_strides(PlansManager(plans).get_configuration("3d_fullres")) == ((2, 2, 2),) * 5
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["strides"] = [[1, 1], *[[2, 2]] * 5]
    with pytest.raises(InputError, match=r"the plan's configuration: stride \[2, 2\] is not three positive"):
        plan_strides(PlansManager(plans).get_configuration("2d"))


def test_an_interrupted_checkpoint_write_leaves_the_previous_checkpoint_whole(
    v2_plan: tuple[dict, dict, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from stuseg.finetune.trainer import STUNetTrainer_small

    plans, dataset_json, _ = v2_plan
    trainer = STUNetTrainer_small(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    trainer.initialize()
    path = Path(trainer.output_folder) / "checkpoint_latest.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(path))
    before = path.read_bytes()
    assert torch.load(path, map_location="cpu", weights_only=False)["current_epoch"] == 1

    def cut_off(obj: object, f: str, *args: object, **kwargs: object) -> None:
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")  # what Ctrl-C mid-write leaves
        raise KeyboardInterrupt

    trainer.current_epoch = 5
    monkeypatch.setattr(torch, "save", cut_off)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(path))
    assert path.read_bytes() == before
