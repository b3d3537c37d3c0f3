"""Train or fine-tune the Hugging Face-format value-residual GPT (the model code the HF export ships)
with DeepSpeed ZeRO, on the same data, schedule and metrics as pretrain/pretrain_resformer.py.

    torchrun --nproc-per-node 2 pretrain/pretrain_hf_deepspeed.py --config tiny_cpu --deepspeed zero2
    deepspeed --num_gpus 8 pretrain/pretrain_hf_deepspeed.py --config resformer_468m --deepspeed zero3 \\
        parallel.params_dtype=bf16 data.paths=[...]
    RF_ENGINE=deepspeed sbatch --nodes 2 --ntasks-per-node 8 slurm/pretrain.sbatch resformer_468m ...
    # fine-tune an exported model (tools/convert_checkpoint_to_hf.py) and write it back as HF:
    torchrun --nproc-per-node 2 pretrain/pretrain_hf_deepspeed.py --config tiny_cpu --from-hf hf/x \\
        optim.lr=1e-4 train.train_steps=200 logging.dir=runs/x-ft checkpoint.dir=runs/x-ft/checkpoints

`--config` is a preset in rf_megatron/presets/ or a YAML file (its `parallel` TP/PP are the Megatron
trainer's and are not used here: DeepSpeed is data parallel over all processes); `--deepspeed` is
zero1 | zero2 | zero3 or a DeepSpeed JSON file whose "auto" values come from the run config. The
run resumes from checkpoint.dir automatically and ends by writing an HF folder
(deepspeed.hf_output, default <logging.dir>/hf). Exit 2 with one `error:` line on bad input.
"""
import argparse

from .. import child_lifetime
from ..entry_point import run_entry_point
from ..errors import ArgumentParser
from ..resume import stop_if_finished
from ..run_config import load_run_config

# At import, so that it also runs where multiprocessing's spawned helpers re-import this script (__mp_main__)
child_lifetime.install()


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny_cpu", help="run config preset or YAML path")
    p.add_argument("--deepspeed", help="zero1 | zero2 | zero3 or a DeepSpeed JSON file (deepspeed.config)")
    p.add_argument("--zero-stage", type=int, help="override the ZeRO stage (deepspeed.zero_stage)")
    p.add_argument("--from-hf", help="start from this HF folder (deepspeed.init_from_hf)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from ..hf.cli import quiet

    quiet()

    def build():
        args = parse_args(argv)  # a mistake here is a ConfigError: one line for the job
        overrides = list(args.overrides)
        for flag, key in ((args.deepspeed, "config"), (args.zero_stage, "zero_stage"), (args.from_hf, "init_from_hf")):
            if flag is not None:
                overrides.append(f"deepspeed.{key}={flag}")
        cfg = load_run_config(args.config, overrides)  # config errors come before the slow imports
        stop_if_finished(cfg)  # a finished run (a re-run sweep, a resubmitted job) ends here, as fast
        from ..engines.deepspeed import DeepSpeedTrainer

        return DeepSpeedTrainer(cfg)

    return run_entry_point(build)


def run() -> None:
    """The console script: main() with the exit that a process group needs (child_lifetime.exit_process)."""
    child_lifetime.exit_process(main())


if __name__ == "__main__":
    run()
