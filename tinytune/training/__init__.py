"""The pieces a training recipe is made of, under one namespace.

A recipe writes ``from tinytune import training`` (or imports names from here) and keeps its own
loop visible; this package holds what stays the same between recipes: setup from settings, the
resumable batch stream, the accumulation window (forward, loss, backward), the optimizer step,
the log window and progress bar, validation, sample generations, and training-state checkpoints.
"""

from tinytune.training.activation_checkpointing import apply_activation_checkpointing
from tinytune.training.activation_offloading import ActivationOffloader, apply_activation_offloading
from tinytune.training.checkpointing import (
    ShardedTrainingState,
    TrainingState,
    open_checkpointer,
    open_sharded_checkpointer,
    resume_sharded_state,
    resume_training_state,
    save_sharded_state,
    save_training_state,
)
from tinytune.training.data import BatchStream, split_dataset, to_device, validation_batches
from tinytune.training.distributed_run import (
    DistributedRun,
    distributed_run,
    distributed_train_data,
    distributed_validator,
    finish_distributed,
    load_sharded_model,
    sharded_early_stopping,
)
from tinytune.training.dpo import (
    chosen_rejected_logps,
    dpo_accumulate,
    dpo_eval,
    make_reference,
    policy_and_reference,
)
from tinytune.training.early_stopping import EarlyStopping
from tinytune.training.evaluation import evaluate_loss
from tinytune.training.gguf_export import export_gguf
from tinytune.training.hf_export import export_hf_model
from tinytune.training.kto_step import kto_accumulate, kto_eval
from tinytune.training.loss_scaling import LossScaler, autocast_fp16, fp16_loss_scaler, scaled
from tinytune.training.losses import (
    IGNORE_INDEX,
    count_label_tokens,
    dpo_loss,
    sft_loss,
    sft_loss_sum,
    sft_loss_sum_vocab_parallel,
)
from tinytune.training.lr_schedulers import build_lr_scheduler, get_lr_scheduler
from tinytune.training.memory import memory_stats, reset_peak_memory
from tinytune.training.metric_logging import (
    LogWindow,
    build_metric_loggers,
    end_after_stop,
    log_train_row,
    plot_and_write_summary,
    report_early_stop,
    report_patience_stop,
    run_summary,
    train_row,
    validation_row,
    write_summary,
)
from tinytune.training.neftune import activate_neftune
from tinytune.training.optim import build_optimizer, param_groups
from tinytune.training.padding_free import drop_unlabeled_tail
from tinytune.training.plotting import plot_loss
from tinytune.training.precision import Precision
from tinytune.training.preference_losses import PreferenceLoss
from tinytune.training.progress import TrainProgress
from tinytune.training.prompting import SampleGenerations
from tinytune.training.resume_check import config_fingerprint
from tinytune.training.reward_step import reward_accumulate, reward_eval
from tinytune.training.setup import (
    TrainData,
    build_collate,
    check_training_dtype,
    fsdp_policy,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    model_lora,
    prepare_output_dir,
    resolve_checkpoint_dir,
    setup_device,
    train_data,
    train_val_datasets,
)
from tinytune.training.steps import (
    NonFiniteGuard,
    build_optimizer_and_scheduler,
    current_lr,
    optimizer_step,
    sft_accumulate,
)
from tinytune.training.text_metrics import evaluate_generations, validation_generation_row

__all__ = [
    "IGNORE_INDEX",
    "BatchStream",
    "DistributedRun",
    "EarlyStopping",
    "LogWindow",
    "Precision",
    "NonFiniteGuard",
    "PreferenceLoss",
    "SampleGenerations",
    "ShardedTrainingState",
    "TrainData",
    "TrainProgress",
    "TrainingState",
    "activate_neftune",
    "apply_activation_checkpointing",
    "apply_activation_offloading",
    "ActivationOffloader",
    "build_collate",
    "check_training_dtype",
    "fsdp_policy",
    "build_lr_scheduler",
    "build_metric_loggers",
    "build_optimizer",
    "build_optimizer_and_scheduler",
    "chosen_rejected_logps",
    "config_fingerprint",
    "count_label_tokens",
    "current_lr",
    "distributed_run",
    "distributed_train_data",
    "distributed_validator",
    "dpo_accumulate",
    "dpo_eval",
    "dpo_loss",
    "drop_unlabeled_tail",
    "end_after_stop",
    "evaluate_generations",
    "evaluate_loss",
    "export_gguf",
    "export_hf_model",
    "finish_distributed",
    "get_lr_scheduler",
    "kto_accumulate",
    "kto_eval",
    "load_model",
    "load_model_and_tokenizer",
    "load_sharded_model",
    "load_tokenizer",
    "log_train_row",
    "model_lora",
    "make_reference",
    "memory_stats",
    "open_checkpointer",
    "open_sharded_checkpointer",
    "optimizer_step",
    "LossScaler",
    "autocast_fp16",
    "fp16_loss_scaler",
    "scaled",
    "param_groups",
    "plot_and_write_summary",
    "plot_loss",
    "policy_and_reference",
    "prepare_output_dir",
    "report_early_stop",
    "report_patience_stop",
    "reset_peak_memory",
    "resolve_checkpoint_dir",
    "resume_sharded_state",
    "resume_training_state",
    "reward_accumulate",
    "reward_eval",
    "run_summary",
    "save_sharded_state",
    "save_training_state",
    "setup_device",
    "sharded_early_stopping",
    "sft_accumulate",
    "sft_loss",
    "sft_loss_sum",
    "sft_loss_sum_vocab_parallel",
    "split_dataset",
    "to_device",
    "train_data",
    "train_row",
    "train_val_datasets",
    "validation_batches",
    "validation_generation_row",
    "validation_row",
    "write_summary",
]
