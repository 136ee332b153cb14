"""One run as one serializable object, built once from the flags.

The paper's hyperparameters (§4.1, Table 6: LARS, warmup, poly decay, label
smoothing, ε, τ) are flags; ``TrainConfig`` is what the loop of Algorithm 1
(``conadv/trainer.py``) is built from.

``RunConfig.from_flags`` reads every ConAdv flag once, validates it (one
line naming the flag on a bad value, ``flags/validation.py``) and groups
the values by who uses them: ``DataConfig`` builds the data source,
``DeviceConfig`` the distribution strategy, and ``TrainConfig`` (with its
``AttackConfig``) the trainer. Whatever depends on the devices (batch
divisibility, BatchNorm groups, ``auto`` choices) is settled by
``for_strategy`` once the strategy exists. ``run_config.json`` in the
model_dir is this object (``to_dict``/``from_dict`` round-trip it), and the
run identity (``conadv/run/run_identity.py``) compares its defining flags.
"""

from __future__ import annotations

import dataclasses
import json
import types
from typing import Any

from conadv import steps as steps_lib
from conadv.attack import AttackConfig
from conadv.run import run_identity
from flags import validation
from input_pipeline.base import DataSource, PipelineOptions

#: Every flag a run is built from (``--model_dir`` is resolved separately;
#: absl's own ``--verbosity`` only sets the log level).
RUN_FLAGS = tuple(
    name
    for name in run_identity.DEFINING_FLAGS + run_identity.RESUMABLE_FLAGS
    if name != "verbosity"
)


def _from_same_names(cls, flag_values: dict, **others):
    """``cls`` with each field that a flag of the same name sets taken from that flag."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in flag_values.items() if k in fields}, **others)


@dataclasses.dataclass
class TrainConfig:
    """One run, as the flags describe it (see ``flags/``)."""

    model_dir: str
    method: str = steps_lib.CONADV
    staleness: int = 1
    model: str = "resnet20"
    width_multiplier: float = 1.0
    bn_group_size: int | None = None  # None: the smallest group of >= 64 examples
    #: BatchNorm moving statistics: moving ← momentum·moving + (1 − momentum)·batch.
    bn_momentum: float = 0.9
    #: Batches of training examples whose population statistics replace the main
    #: branch's moving statistics for evaluation and export (0: the moving ones).
    precise_bn_batches: int = 200
    precision: str = "float32"
    update_pass: str = steps_lib.CONCATENATED
    global_batch_size: int = 512
    #: Micro-batches per optimizer step (gradient accumulation).
    accumulation_steps: int = 1
    eval_batch_size: int = 512
    train_steps: int | None = None
    train_epochs: float = 30.0
    steps_per_loop: int = 10
    epochs_between_evals: float = 10.0
    checkpoint_steps: int = 0
    optimizer: str = "lars"
    learning_rate: float = 1.0
    warmup_epochs: float = 5.0
    lr_schedule: str = "poly"
    poly_power: float = 2.0
    end_learning_rate: float = 0.0001
    weight_decay: float = 5e-4
    momentum: float = 0.9
    label_smoothing: float = 0.1
    lars_eta: float = 0.001
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    #: Where DisAdv's and ConAdv's adversarial images come from (conadv/free_attack.py).
    attack_source: str = steps_lib.SEPARATE_ATTACK
    #: Robust evaluation: the main branch, as evaluated, under this attack (None: clean only).
    eval_attack: AttackConfig | None = None
    jit_compile: bool = False
    seed: int = 0
    export_dir: str | None = None
    max_checkpoints: int = 3
    #: Eval top-1 whose first reaching is timed (summary.json ``time_to_target_s``).
    target_accuracy: float = 0.759


@dataclasses.dataclass
class DataConfig:
    """Which dataset and how it is read (the source's own flags)."""

    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    num_classes: int | None = None
    one_based_labels: bool = False
    tfds_download: bool = False
    #: A fixed stratified subset of the training set (digits), or None: all of it.
    train_examples: int | None = None
    pipeline: PipelineOptions = dataclasses.field(default_factory=PipelineOptions)

    def build_source(self) -> DataSource:
        from input_pipeline import registry

        extra = {}
        if self.dataset == "imagenet":
            extra["one_based_labels"] = self.one_based_labels
        if self.dataset.startswith("tfds:"):
            extra["tfds_download"] = self.tfds_download
        if self.train_examples is not None:
            extra["train_examples"] = self.train_examples
        return registry.get_source(
            self.dataset,
            image_size=self.image_size,
            data_dir=self.data_dir,
            num_classes=self.num_classes,
            options=self.pipeline,
            **extra,
        )


@dataclasses.dataclass
class DeviceConfig:
    """Where the run computes; ``auto`` values are settled by ``RunConfig.for_strategy``."""

    distribution_strategy: str = "default"
    num_cpu_devices: int = 1
    tpu: str = "local"
    all_reduce_alg: str = "auto"
    jit_compile: str = "auto"
    update_pass: str = "auto"
    #: Seconds of missed heartbeats before a worker is lost, and for all to start.
    peer_timeout: float = 30.0
    cluster_start_timeout: float = 300.0

    def build_strategy(self):
        """The ``tf.distribute`` strategy; a failure is a one-line ``FlagError``, a cluster
        that does not come up a one-line ``ClusterError`` (``conadv/run/cluster.py``)."""
        import tensorflow as tf

        from conadv.run import cluster
        from official import distribute

        distribute.configure_cpu_devices(self.num_cpu_devices)
        try:
            return distribute.get_strategy(
                self.distribution_strategy,
                self.num_cpu_devices,
                self.tpu,
                all_reduce_alg=self.all_reduce_alg,
                peer_timeout=self.peer_timeout,
                start_timeout=self.cluster_start_timeout,
            )
        except distribute.StrategyError as error:
            raise validation.FlagError(
                f"--distribution_strategy={self.distribution_strategy}: {error}"
            ) from None
        except tf.errors.OpError as error:
            resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
            failure = cluster.start_failure(error, resolver, self.cluster_start_timeout)
            if failure is None:
                raise
            raise failure from None


@dataclasses.dataclass
class RunConfig:
    """Everything one start of ``main.py`` does."""

    mode: str
    #: The value of every flag in ``RUN_FLAGS``, as given.
    flags: dict[str, Any]
    data: DataConfig
    devices: DeviceConfig
    train: TrainConfig
    eval_predictions: bool = False
    mlperf_log: str | None = None
    mlperf_org: str = "conadv"
    mlperf_division: str = "auto"
    mlperf_platform: str | None = None
    #: The length (steps) the learning-rate schedule is planned over, and each
    #: resume that re-planned it: kept in run_config.json by
    #: ``run_identity.check_schedule`` once the trainer has resolved the length.
    schedule_steps: int | None = None
    schedule_changes: list[dict] = dataclasses.field(default_factory=list)
    #: Each start whose tf.data service mode differed from the last one's: kept in
    #: run_config.json by ``conadv/run/input_mode.py`` (``say_and_record``).
    input_modes: list[dict] = dataclasses.field(default_factory=list)
    #: The training data's fingerprint (``DataSource.fingerprint``: its content, not its
    #: path), set by ``with_data``; a resume on other data is refused (run_identity.py).
    data_fingerprint: str | None = None

    @property
    def model_dir(self) -> str:
        return self.train.model_dir

    # ------------------------------------------------------------ building

    @classmethod
    def from_flags(cls, values) -> RunConfig:
        """Validates the flags (absl ``FLAGS`` or any object with their names) and builds."""
        validation.validate(values)
        v = values
        flag_values = {name: getattr(v, name) for name in RUN_FLAGS}
        data = _from_same_names(
            DataConfig, flag_values, pipeline=_from_same_names(PipelineOptions, flag_values)
        )
        devices = _from_same_names(DeviceConfig, flag_values)
        attack = AttackConfig(
            eps=v.attack_eps,
            step_size=v.attack_step_size,
            num_steps=v.attack_steps,
            random_init=v.attack_init == "random",
            bn_branch=v.attack_bn,
            target=v.attack_target,
        )
        eval_attack = None
        if v.eval_attack_eps is not None:
            # The main branch with moving statistics, as evaluated.
            eval_attack = AttackConfig(
                eps=v.eval_attack_eps,
                step_size=v.eval_attack_step_size,
                num_steps=v.eval_attack_steps,
                random_init=True,
                bn_branch="main",
            )
        train = TrainConfig(
            model_dir=v.model_dir or run_identity.default_model_dir(flag_values),
            method=v.method,
            staleness=v.staleness,
            attack_source=v.attack_source,
            model=v.model,
            width_multiplier=v.width_multiplier,
            bn_group_size=v.bn_group_size,
            bn_momentum=v.bn_momentum,
            precise_bn_batches=v.precise_bn_batches,
            precision=v.precision,
            update_pass=v.update_pass,
            global_batch_size=v.batch_size,
            accumulation_steps=v.accumulation_steps,
            eval_batch_size=v.eval_batch_size,
            train_steps=v.train_steps,
            train_epochs=v.train_epochs,
            steps_per_loop=v.steps_per_loop,
            epochs_between_evals=v.epochs_between_evals,
            checkpoint_steps=v.checkpoint_steps,
            optimizer=v.optimizer,
            learning_rate=v.learning_rate,
            warmup_epochs=v.warmup_epochs,
            lr_schedule=v.lr_schedule,
            poly_power=v.poly_power,
            end_learning_rate=v.end_learning_rate,
            weight_decay=v.weight_decay,
            momentum=v.momentum,
            label_smoothing=v.label_smoothing,
            lars_eta=v.lars_eta,
            attack=attack,
            eval_attack=eval_attack,
            jit_compile=v.jit_compile == "true",
            seed=v.seed,
            export_dir=v.export_dir,
            target_accuracy=v.target_accuracy,
        )
        return cls(
            mode=v.mode,
            flags=flag_values,
            data=data,
            devices=devices,
            train=train,
            eval_predictions=v.eval_predictions,
            mlperf_log=v.mlperf_log,
            mlperf_org=v.mlperf_org,
            mlperf_division=v.mlperf_division,
            mlperf_platform=v.mlperf_platform,
        )

    def for_strategy(self, strategy, image_size: int) -> RunConfig:
        """This run on ``strategy``: the device-dependent checks and ``auto`` choices.

        ``image_size`` is the source's (the flag may leave it to the dataset).
        """
        import tensorflow as tf

        replicas = strategy.num_replicas_in_sync
        values = types.SimpleNamespace(**self.flags)
        validation.validate_replica_count(values, replicas)
        validation.validate_batch_sizes(values, replicas)
        validation.validate_bn_group_size(values, replicas)
        validation.validate_image_size(self.train.model, image_size)
        on_tpu = isinstance(strategy, tf.distribute.TPUStrategy)
        jit = on_tpu if self.devices.jit_compile == "auto" else self.devices.jit_compile == "true"
        update_pass = self.devices.update_pass
        if update_pass == "auto":
            # One pass of 2B rows fills TPU and GPU matrix units better; on CPU
            # the two half-size passes avoid BatchNorm's split and concatenation copies.
            accelerated = on_tpu or bool(tf.config.list_logical_devices("GPU"))
            update_pass = "concatenated" if accelerated else "separate"
        train = dataclasses.replace(self.train, jit_compile=jit, update_pass=update_pass)
        return dataclasses.replace(self, train=train)

    def with_data(self, source) -> RunConfig:
        """This run on ``source``'s data: its fingerprint recorded and compared."""
        return dataclasses.replace(self, data_fingerprint=source.fingerprint())

    # ------------------------------------------------------- serialization

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        train = dict(values["train"])
        train["attack"] = AttackConfig(**train["attack"])
        if train.get("eval_attack") is not None:
            train["eval_attack"] = AttackConfig(**train["eval_attack"])
        data = dict(values["data"])
        data["pipeline"] = PipelineOptions(**data["pipeline"])
        return cls(
            **{
                **values,
                "train": TrainConfig(**train),
                "data": DataConfig(**data),
                "devices": DeviceConfig(**values["devices"]),
            }
        )

    def write(self, path: str):
        """Writes atomically (a reader never sees half a file); local or gs:// paths."""
        from conadv.run.run_files import write_json

        write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str) -> RunConfig:
        import tensorflow as tf

        with tf.io.gfile.GFile(path) as f:
            return cls.from_dict(json.load(f))
