#!/usr/bin/env python3
"""A tiny MCP stdio client (stdlib only) used by scripts/demo.

Usage: mcp_stdio_client.py SERVER_CMD... -- CALLS_JSON
CALLS_JSON is a list of [tool_name, arguments]. Prints each result's text,
and progress notifications as they stream in.
"""
import json
import subprocess
import sys
import time

sep = sys.argv.index("--")
cmd, calls = sys.argv[1:sep], json.loads(sys.argv[sep + 1])
proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def send(msg):
    proc.stdin.write((json.dumps(msg) + "\n").encode())
    proc.stdin.flush()


def wait_for(rid):
    while True:
        line = proc.stdout.readline()
        if not line:
            sys.exit("server closed stdout")
        msg = json.loads(line)
        if msg.get("id") == rid:
            return msg
        if msg.get("method") == "notifications/progress":
            print("  … progress:", json.dumps(msg["params"].get("message")), flush=True)


t0 = time.time()
send({"jsonrpc": "2.0", "id": 0, "method": "initialize",
      "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                 "clientInfo": {"name": "demo", "version": "1"}}})
init = wait_for(0)
print(f"initialize answered in {(time.time() - t0) * 1000:.1f} ms by "
      f"{init['result']['serverInfo']['name']} {init['result']['serverInfo']['version']}")
send({"jsonrpc": "2.0", "method": "notifications/initialized"})
for i, (name, args) in enumerate(calls, start=1):
    print(f"\n>>> {name} {json.dumps(args)}")
    send({"jsonrpc": "2.0", "id": i, "method": "tools/call",
          "params": {"name": name, "arguments": args, "_meta": {"progressToken": f"p{i}"}}})
    res = wait_for(i)["result"]
    for block in res.get("content", []):
        if block.get("type") == "text":
            print(block["text"])
    if res.get("isError"):
        print("(isError)")
proc.stdin.close()
proc.wait(timeout=10)
