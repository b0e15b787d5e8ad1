# opencode-agent shell integration for bash.
#
# Source it from ~/.bashrc:
#     source /path/to/opencode-mcp/scripts/shell/opencode-agent.bash
#
# Then `opencode [ARGS...]` starts the OpenCode TUI through
# `opencode-agent run -- ARGS...`, so every instance you open is advertised
# (mDNS on this machine by default) and withdrawn when you quit it.
#
# - OpenCode's own subcommands (run, serve, auth, models, ...) and
#   -h/--help/-v/--version go straight to OpenCode, unwrapped.
# - `command opencode ...` always runs the bare binary (the escape hatch).
# - OPENCODE_AGENT_ARGS adds agent options, split on spaces, e.g.
#     export OPENCODE_AGENT_ARGS='--relay-dir'
#   RELAY_SSH_CMD, INSTANCE_NAME and RELAY_REGISTRY_DIR are read by the agent.
# - Without opencode-agent on PATH, `opencode` is the bare binary.
# - The agent logs to ${XDG_STATE_HOME:-~/.local/state}/opencode-agent/agent.log.

opencode() {
    case "${1-}" in
        run | serve | web | attach | auth | agent | models | mcp | upgrade | uninstall | \
            stats | export | import | github | pr | debug | acp | session | completion | \
            plugin | -h | --help | -v | --version)
            command opencode "$@"
            return
            ;;
    esac
    if ! command -v opencode-agent >/dev/null 2>&1; then
        command opencode "$@"
        return
    fi
    # shellcheck disable=SC2086 # OPENCODE_AGENT_ARGS is split into words on purpose
    opencode-agent run ${OPENCODE_AGENT_ARGS-} -- "$@"
}
