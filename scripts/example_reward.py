#!/usr/bin/env python3
"""An external reward program for ferrite (`kind = "command"` in `[[reward.parts]]`).

ferrite writes one JSON object a line for each completion:
  {"completion": "...", "completion_tokens": 12, "prompt": ..., "answer": "...", "metadata": {...}}
(`prompt` as the record gives it: text or a list of chat messages; `answer` may be null) and
reads one line back: a number, or {"reward": x, "correct": true/false}. Print nothing else to
stdout (use stderr for logs) and flush after each answer. A program that does not answer within
`timeout_ms` is stopped and started again; its completion's part fails and is counted.

This one judges the final answer with Hugging Face's math-verify when it is installed
(`pip install math-verify`), and by exact comparison of the last number otherwise:

  [[reward.parts]]
  name = "verified"
  kind = "command"
  command = ["python3", "scripts/example_reward.py"]
"""
import json
import re
import sys

try:
    from math_verify import parse, verify
except ImportError:  # exact match of the last number
    parse = verify = None

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text):
    found = NUMBER.findall(text or "")
    return found[-1] if found else None


def judge(completion, answer):
    if answer is None:
        return False
    if parse is not None:
        return bool(verify(parse(str(answer)), parse(completion)))
    mine = last_number(completion)
    return mine is not None and mine == last_number(str(answer))


for line in sys.stdin:
    request = json.loads(line)
    right = judge(request["completion"], request.get("answer"))
    print(json.dumps({"reward": 1.0 if right else 0.0, "correct": right}), flush=True)
