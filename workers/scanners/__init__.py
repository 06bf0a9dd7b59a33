"""Scanners: pure scan logic, no Celery. Each returns normalised finding dicts.

A finding: rule_id, severity (critical/high/medium/low/info), confidence, path,
start_line, end_line, message, engine, cwe, fingerprint, and for secrets a hash
and a masked preview (the value itself never leaves the scanner process).
"""
