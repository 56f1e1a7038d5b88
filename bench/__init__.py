"""shmserve's benchmark: scenarios, ceilings measured in the same run, and peers side by side.

Run ``python -m bench`` from the repository root; docs/performance.md explains the figures.
"""
