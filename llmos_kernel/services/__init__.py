"""Kernel services behind the fs, tools and memory syscalls."""
