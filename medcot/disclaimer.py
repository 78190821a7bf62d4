"""The research notice shown wherever medcot answers a medical question (CLI, reports, server, exports)."""

DISCLAIMER = "medcot is a research tool. Its answers are not medical advice."
