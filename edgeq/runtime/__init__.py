"""The device side: load an edgeq artifact and measure it. Never imports torch or transformers.

Run as ``python -m edgeq.runtime MANIFEST --plan PLAN.json --out RESULT.json``.
"""
