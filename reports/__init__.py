"""Rendering from stored result files only (pandas, matplotlib); never imports torch."""
