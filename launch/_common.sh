# Shared by the launch scripts: child PIDs are kept and stopped on exit (never by name).
PIDS=()
DRY_RUN=${DRY_RUN:-0}
run_bg() {  # run_bg NAME CMD... : start in the background (or print it in a dry run)
  local name=$1; shift
  if [ "$DRY_RUN" = "1" ]; then
    printf '%s\n' "$*"
    return
  fi
  echo "starting $name: $*"
  "$@" &
  PIDS+=($!)
}
stop_children() {
  [ "${#PIDS[@]}" -eq 0 ] && return
  echo "stopping ${PIDS[*]}"
  kill -TERM "${PIDS[@]}" 2>/dev/null || true
  wait "${PIDS[@]}" 2>/dev/null || true
}
wait_children() {
  [ "$DRY_RUN" = "1" ] && return
  trap stop_children EXIT INT TERM
  wait -n "${PIDS[@]}" || true
}
