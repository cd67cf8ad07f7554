"""Run by test_plugin.py as a script: one vLLM engine in vLLM's own processes (engine core and
worker spawned, each loading its plugins through the entry points), serving two adapters and a
request without one in one batch with both adapter slots taken. Prints the tokens as JSON."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    from conftest import lora, serve

    base, lora0, lora1 = sys.argv[1:4]
    reqs = [lora("lora0", 10, lora0), lora("lora1", 11, lora1)]
    print("TOKENS " + json.dumps(serve(base, [reqs[0], reqs[1], None, reqs[0]], max_loras=2)))
