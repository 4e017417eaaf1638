"""Behaviour held across refactors: imatrix files, GGUFs quantized with them, GPTQ checkpoints, byte for byte as
recorded before the package was laid out by format (tests/golden.py; re-record an intended change with
`python -m tests.golden --record CASE` in its own commit, saying why). Split over three files so that the
two test workers share the work."""

from tests import golden

work, test_same_bytes_as_recorded = golden.test_module(lambda c: c.split("/")[0] in ("imatrix", "gguf-imatrix", "gptq"))
