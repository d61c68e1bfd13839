# Sourced (not run) by the commands/ scripts: where the checkout is, how to call cirkit, the
# offline setting, and a training step that resumes a saved run.
#   CIRKIT  the command to run (default `cirkit`; e.g. "python -m cirkit")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CIRKIT=${CIRKIT:-cirkit}
export HF_HUB_OFFLINE=1

# train_resumable DIR ARGS...: `cirkit train -o DIR ARGS...`, with --resume when DIR holds a
# saved run (finished or interrupted), so re-running a script continues instead of failing.
train_resumable() {
  local dir=$1; shift
  if [ -f "$dir/trainer_state/state.json" ]; then
    $CIRKIT train -o "$dir" "$@" --resume
  else
    $CIRKIT train -o "$dir" "$@"
  fi
}
