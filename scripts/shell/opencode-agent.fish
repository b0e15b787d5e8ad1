# opencode-agent shell integration for fish.
#
# Source it from ~/.config/fish/config.fish:
#     source /path/to/opencode-mcp/scripts/shell/opencode-agent.fish
# (or copy it to ~/.config/fish/functions/opencode.fish).
#
# Then `opencode [ARGS...]` starts the OpenCode TUI through
# `opencode-agent run -- ARGS...`, so every instance you open is advertised
# (mDNS on this machine by default) and withdrawn when you quit it.
#
# - OpenCode's own subcommands (run, serve, auth, models, ...) and
#   -h/--help/-v/--version go straight to OpenCode, unwrapped.
# - `command opencode ...` always runs the bare binary (the escape hatch).
# - OPENCODE_AGENT_ARGS adds agent options, split on spaces, e.g.
#     set -gx OPENCODE_AGENT_ARGS --relay-dir
#   RELAY_SSH_CMD, INSTANCE_NAME and RELAY_REGISTRY_DIR are read by the agent.
# - Without opencode-agent on PATH, `opencode` is the bare binary.
# - The agent logs to $XDG_STATE_HOME/opencode-agent/agent.log (~/.local/state/...).

function opencode --wraps opencode --description 'OpenCode, advertised by opencode-agent (`command opencode` for the bare binary)'
    if contains -- "$argv[1]" run serve web attach auth agent models mcp upgrade uninstall \
            stats export import github pr debug acp session completion plugin -h --help -v --version
        command opencode $argv
        return $status
    end
    if not command -q opencode-agent
        command opencode $argv
        return $status
    end
    set -l extra
    if set -q OPENCODE_AGENT_ARGS
        set extra (string split --no-empty ' ' -- $OPENCODE_AGENT_ARGS)
    end
    opencode-agent run $extra -- $argv
end
