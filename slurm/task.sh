#!/bin/bash
# One training rank under srun (started by slurm/pretrain.sbatch; runs inside the container if one
# is used):  srun ... bash slurm/task.sh PYTHON pretrain/pretrain_resformer.py --config ...
#
# * RANK / WORLD_SIZE / LOCAL_RANK from SLURM's per-task variables (MASTER_ADDR / MASTER_PORT come
#   from the batch script: no scontrol needed in here).
# * Stop requests reach the trainer's main process only. SLURM delivers srun-forwarded signals to
#   EVERY process of the step, including the helper processes that the checkpoint writer keeps
#   (Megatron's dist_checkpointing starts a long-lived multiprocessing Manager at the first save);
#   a SIGUSR1 there kills the helper and the very save it asked for fails. So the batch script
#   sends SIGUSR2, which the trainer and all its children ignore (inherited SIG_IGN), and this
#   wrapper turns it into SIGUSR1 for the trainer's pid alone. It resends every RF_SIGNAL_RESEND
#   seconds until the trainer exits, because a rank still importing ignores SIGUSR1 (it starts
#   with SIGUSR1 ignored so that an early signal cannot kill it) and the trainer's handler only
#   sets a flag, so repeats are harmless.
# * SIGTERM (scancel, the hard time limit) reaches the trainer from SLURM directly; this wrapper
#   just keeps waiting so that the task's exit status is the trainer's.
set -u
export RANK=${SLURM_PROCID:?not started by srun} WORLD_SIZE=${SLURM_NTASKS:?} LOCAL_RANK=${SLURM_LOCALID:?}
trap '' USR1 USR2            # inherited by the trainer and everything it spawns
"$@" &
PID=$!
STOP=0; RESENDER=""
request_stop() {
  [ "$STOP" = 1 ] && return 0
  STOP=1
  kill -USR1 "$PID" 2>/dev/null
  ( trap '' USR1 USR2 TERM; while sleep "${RF_SIGNAL_RESEND:-10}"; do kill -USR1 "$PID" 2>/dev/null || exit 0; done ) &
  RESENDER=$!
}
trap request_stop USR1 USR2
trap : TERM INT
while :; do
  wait "$PID"; RC=$?
  kill -0 "$PID" 2>/dev/null || break   # returned because of a trap: the trainer still runs
done
# wait returned early for a trap and the trainer exited meanwhile: its status is still pending
[ "$RC" -gt 128 ] && { wait "$PID" 2>/dev/null; r=$?; [ "$r" = 127 ] || RC=$r; }
[ -n "$RESENDER" ] && kill "$RESENDER" 2>/dev/null
# exit 2 is the trainer's one-line error: tell the batch script, which may see another task's code from srun
[ "$RC" = 2 ] && [ -n "${RF_ERROR_MARK:-}" ] && touch "$RF_ERROR_MARK" 2>/dev/null
exit "$RC"
