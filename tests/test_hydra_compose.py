"""Every option of every config group composes, and instantiates where this machine has the hardware."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from omegaconf import DictConfig, OmegaConf

from lightning_accum import SampleCountRescaler
from lightning_accum.demos import ExampleDataModule
from lightning_accum.mixin import MissingRescalerError
from lightning_accum_app.app import build, check_num_nodes, run_training
from lightning_accum_app.composition import Accumulation, model_kwargs

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(tmp_path: Path, *overrides: str, hydra_config: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "train", overrides=[f"paths.output_dir={tmp_path}", *overrides], return_hydra_config=hydra_config
        )


def test_every_group_has_its_options():
    assert set(options("data")) >= {"regression", "digits", "tokens"}
    assert set(options("model")) >= {"mlp", "causal_lm"}
    assert set(options("accumulation")) == {"none", "fixed", "schedule", "noise_scale"}
    assert set(options("trainer")) >= {"cpu", "ddp_cpu", "gpu", "ddp_gpu", "torchrun", "slurm"}
    assert set(options("logger")) >= {"csv", "tensorboard"}
    assert set(options("hydra/launcher")) >= {"parallel", "slurm"}
    assert set(options("hparams_search")) >= {"digits_optuna", "lm_optuna"}
    for group in ("callbacks", "experiment", "debug"):
        assert options(group)


@pytest.mark.parametrize("name", options("data"))
def test_data_options_instantiate_and_load(tmp_path, name):
    cfg = compose_train(tmp_path, f"data={name}")
    dm = instantiate(cfg.data)
    assert isinstance(dm, ExampleDataModule)
    batch = next(iter(dm.train_dataloader()))
    assert batch["valid"].dtype == torch.bool and batch["valid"].all()


@pytest.mark.parametrize(("model", "data"), [("mlp", "digits"), ("mlp", "regression"), ("causal_lm", "tokens")])
def test_model_options_instantiate_with_a_partial_optimizer(tmp_path, model, data):
    cfg = compose_train(tmp_path, f"model={model}", f"data={data}")
    module = instantiate(cfg.model, **model_kwargs(instantiate(cfg.data)))
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == cfg.model.optimizer.lr


@pytest.mark.parametrize(
    ("name", "trainer_k", "scheduler"), [("none", 1, None), ("fixed", 4, None), ("schedule", 1, {0: 1, 1: 2, 2: 4})]
)
def test_accumulation_options_decide_k_in_one_place(tmp_path, name, trainer_k, scheduler):
    cfg = compose_train(tmp_path, f"accumulation={name}")
    assert isinstance(instantiate(cfg.accumulation), Accumulation)
    _, _, trainer = build(cfg)
    schedulers = [c for c in trainer.callbacks if isinstance(c, GradientAccumulationScheduler)]
    assert trainer.accumulate_grad_batches == trainer_k
    assert [s.scheduling for s in schedulers] == ([scheduler] if scheduler else [])
    assert cfg.data.accumulate_grad_batches == cfg.accumulation.k  # the data module sees the same K


def test_fixed_k_is_overridable_and_reaches_the_trainer_and_data(tmp_path):
    cfg = compose_train(tmp_path, "accumulation.k=3", "data.sampler=global")
    dm, _, trainer = build(cfg)
    assert trainer.accumulate_grad_batches == 3 and dm.accumulate_grad_batches == 3
    assert dm.train_dataloader().batch_sampler.effective_batch_size == 3 * cfg.data.micro_batch_size


@pytest.mark.parametrize("key", ["accumulate_grad_batches=2", "use_distributed_sampler=false"])
def test_trainer_config_cannot_set_what_accumulation_or_data_decide(tmp_path, key):
    cfg = compose_train(tmp_path, "accumulation=schedule", "data.sampler=global", f"+trainer.{key}")
    with pytest.raises(ValueError, match="decide"):
        build(cfg)


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_compose_with_an_overridable_precision(tmp_path, name):
    cfg = compose_train(tmp_path, f"trainer={name}", "trainer.precision=bf16-mixed")
    assert cfg.trainer.precision == "bf16-mixed"
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("no GPU on this machine: composed only")
    _, _, trainer = build(cfg)
    assert isinstance(trainer, pl.Trainer)
    assert trainer.precision == "bf16-mixed"
    expected_devices = {"cpu": 1, "ddp_cpu": 2, "torchrun": 1, "slurm": 2}.get(name)
    if expected_devices:
        assert trainer.num_devices == expected_devices


def test_torchrun_trainer_takes_its_devices_from_torchrun_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    cfg = compose_train(tmp_path, "trainer=torchrun")
    assert (cfg.trainer.devices, cfg.trainer.strategy) == (4, "ddp")


@pytest.mark.parametrize("name", ["slurm", "torchrun"])
def test_num_nodes_is_one_key_that_the_trainer_and_the_slurm_launcher_read(tmp_path, monkeypatch, name):
    monkeypatch.setenv("GROUP_WORLD_SIZE", "5")  # torchrun's node count does not decide it: the key does
    for overrides, nodes in (([], 1), (["trainer.num_nodes=3"], 3)):
        cfg = compose_train(tmp_path, f"trainer={name}", "hydra/launcher=slurm", *overrides, hydra_config=True)
        assert (cfg.trainer.num_nodes, instantiate(cfg.hydra.launcher).params["nodes"]) == (nodes, nodes)
        assert build(cfg)[2].num_nodes == nodes


@pytest.mark.parametrize(
    ("env", "option"),
    [
        ({"TORCHELASTIC_RUN_ID": "none", "GROUP_WORLD_SIZE": "2"}, "torchrun --nnodes=2"),
        ({"SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "train"}, "Slurm --nodes=2"),
    ],
)
def test_run_on_other_nodes_than_trainer_num_nodes_is_refused_naming_the_key(tmp_path, env, option):
    trainer = compose_train(tmp_path, "trainer=slurm").trainer
    with pytest.raises(ValueError, match=f"{option} started this run on 2 nodes, but trainer.num_nodes=1. Pass "):
        check_num_nodes(trainer, env)
    check_num_nodes(OmegaConf.merge(trainer, {"num_nodes": 2}), env)  # agrees: no error
    check_num_nodes(trainer, {})  # no launcher: one process


@pytest.mark.parametrize("name", options("callbacks"))
def test_callback_options_instantiate(tmp_path, name):
    cfg = compose_train(tmp_path, f"callbacks={name}")
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert callbacks and all(isinstance(c, pl.Callback) for c in callbacks)


@pytest.mark.parametrize("name", ["default", "minimal"])
def test_callbacks_of_the_sample_count_models_hold_one_rescaler(tmp_path, name):
    cfg = compose_train(tmp_path, f"callbacks={name}")
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert sum(isinstance(c, SampleCountRescaler) for c in callbacks) == 1


def test_callbacks_null_names_the_hydra_key(tmp_path):
    cfg = compose_train(tmp_path, "data=regression", "model=mlp", "debug=fast", "logger=csv")
    cfg.callbacks = None  # what `callbacks: null` in a `# @package _global_` debug config composes to
    with pytest.raises(MissingRescalerError, match=r"Trainer\(.*config's `callbacks` group.*`callbacks=default`"):
        run_training(cfg)


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_instantiate(tmp_path, name):
    cfg = compose_train(tmp_path, f"logger={name}")
    loggers = [instantiate(c) for c in cfg.logger.values()]
    assert loggers and all(Path(lg.save_dir) == tmp_path for lg in loggers)


@pytest.mark.parametrize("group", ["experiment", "debug"])
def test_experiment_and_debug_options_build(tmp_path, group):
    for name in options(group):
        build(compose_train(tmp_path, f"{group}={name}"))


@pytest.mark.parametrize(
    ("name", "launcher"),
    [
        ("basic", "BasicLauncher"),
        ("joblib", "JoblibLauncher"),
        ("parallel", "JoblibLauncher"),
        ("slurm", "SlurmLauncher"),
    ],
)
def test_launcher_options_instantiate(tmp_path, name, launcher):
    cfg = compose_train(tmp_path, f"hydra/launcher={name}", hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(launcher)
    if name != "basic":  # Hydra refuses to instantiate its own basic launcher from a config
        assert type(instantiate(cfg.hydra.launcher)).__name__ == launcher


@pytest.mark.parametrize("name", options("hparams_search"))
def test_hparams_search_options_build_and_search_keys_of_the_config(tmp_path, name):
    cfg = compose_train(tmp_path, f"hparams_search={name}", hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert sweeper.direction == ("maximize" if cfg.optimized_metric.endswith("acc") else "minimize")
    assert all(OmegaConf.select(cfg, key) is not None for key in sweeper.params)
    build(cfg)


def test_slurm_launcher_takes_its_tasks_and_nodes_from_the_trainer(tmp_path):
    overrides = ["hydra/launcher=slurm", "trainer=slurm", "trainer.devices=3", "trainer.num_nodes=2"]
    launcher = instantiate(compose_train(tmp_path, *overrides, hydra_config=True).hydra.launcher)
    assert (launcher.params["tasks_per_node"], launcher.params["nodes"]) == (3, 2)


def test_sweep_summary_callback_is_configured(tmp_path):
    cfg = compose_train(tmp_path, hydra_config=True)
    assert type(instantiate(cfg.hydra.callbacks.sweep_summary)).__name__ == "SweepSummary"


def test_group_by_length_switch_reaches_the_sampler_and_the_lm_experiment_uses_it(tmp_path):
    grouped = ("data=tokens", "data.sampler=global", "data.group_by_length=true")
    dm = instantiate(compose_train(tmp_path, *grouped).data)
    sampler = dm.train_dataloader().batch_sampler
    assert sampler.lengths.tolist() == [len(dm.train_set[i]["tokens"]) - 1 for i in range(len(dm.train_set))]
    assert sampler.max_tokens is None
    assert dm.val_dataloader().batch_sampler.lengths is None  # validation order is irrelevant: left ungrouped
    budget = instantiate(compose_train(tmp_path, *grouped, "data.max_tokens=2000").data)
    assert budget.train_dataloader().batch_sampler.max_tokens == 2000
    lm, _, _ = build(compose_train(tmp_path, "experiment=lm_schedule"))
    assert lm.train_dataloader().batch_sampler.lengths is not None


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["data.group_by_length=true"], r"group_by_length=True needs sampler='global', got 'default'"),
        (["data.sampler=global", "data.max_tokens=500"], r"max_tokens=500 bounds .* set group_by_length=True"),
        (["data.sampler=global", "data.group_by_length=true", "data.max_tokens=0"], r"positive int or None, got 0"),
    ],
)
def test_group_by_length_settings_are_checked_at_once(tmp_path, overrides, match):
    cfg = compose_train(tmp_path, "data=tokens", *overrides)
    with pytest.raises(InstantiationException, match=match):
        instantiate(cfg.data)
