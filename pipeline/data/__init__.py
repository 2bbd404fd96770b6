"""The web-data half of the DAG: ingest -> langid -> quality -> dedup -> drop report.

Every stage reads a shard of documents, keeps some (perhaps changed) and drops the rest with one
reason each; `steps.run_doc_stage` does the reading, counting, writing and manifest for all of them.
"""
