#!/usr/bin/env python3
"""A small ReAct agent on langgraph, for fan-out and BRANCH demos.

It talks to any OpenAI-compatible chat-completions endpoint:
    OPENAI_BASE_URL (e.g. http://10.0.2.2:8000/v1), OPENAI_API_KEY (optional), MODEL.
Usage: react_agent.py "question"   — prints the final answer; the tool calls go to stderr.
Tools: `calculator` (arithmetic) and `read_file` (a text file in the sandbox).
"""
import ast
import json
import operator
import os
import sys
from typing import Annotated, TypedDict

import requests
from langgraph.graph import END, StateGraph


class State(TypedDict):
    messages: Annotated[list, operator.add]


_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.Pow: operator.pow, ast.Mod: operator.mod,
    ast.USub: operator.neg, ast.UAdd: operator.pos, ast.FloorDiv: operator.floordiv,
}


def _arith(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.operand))
    raise ValueError("only arithmetic is allowed")


def calculator(expression: str) -> str:
    return str(_arith(ast.parse(expression, mode="eval").body))


def read_file(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(20000)


TOOLS = {"calculator": calculator, "read_file": read_file}
TOOL_SPECS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a text file in the sandbox.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                       "required": ["path"]}}},
]


def call_model(state: State) -> dict:
    base = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1").rstrip("/")
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = "Bearer " + os.environ["OPENAI_API_KEY"]
    body = {"model": os.environ.get("MODEL", "any"), "messages": state["messages"],
            "tools": TOOL_SPECS}
    reply = requests.post(base + "/chat/completions", json=body, headers=headers, timeout=120)
    reply.raise_for_status()
    message = reply.json()["choices"][0]["message"]
    return {"messages": [message]}


def run_tools(state: State) -> dict:
    results = []
    for call in state["messages"][-1].get("tool_calls") or []:
        name = call["function"]["name"]
        try:
            args = json.loads(call["function"].get("arguments") or "{}")
            output = TOOLS[name](**args)
        except Exception as e:  # the model sees the failure and can try again
            output = f"error: {type(e).__name__}: {e}"
        print(f"tool {name} -> {output[:200]}", file=sys.stderr)
        results.append({"role": "tool", "tool_call_id": call["id"], "content": output})
    return {"messages": results}


def route(state: State) -> str:
    return "tools" if state["messages"][-1].get("tool_calls") else END


def build():
    graph = StateGraph(State)
    graph.add_node("agent", call_model)
    graph.add_node("tools", run_tools)
    graph.set_entry_point("agent")
    graph.add_conditional_edges("agent", route, {"tools": "tools", END: END})
    graph.add_edge("tools", "agent")
    return graph.compile()


def main() -> int:
    question = " ".join(sys.argv[1:]) or sys.stdin.read()
    app = build()
    state = app.invoke(
        {"messages": [
            {"role": "system", "content": "Answer the question. Use the tools when they help."},
            {"role": "user", "content": question},
        ]},
        {"recursion_limit": 24},
    )
    print(state["messages"][-1].get("content") or "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
