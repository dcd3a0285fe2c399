"""Scheduler side: adapter residency in vLLM's block pool and the per-step worker commands."""
