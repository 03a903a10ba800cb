"""The rating study file (`study.duckdb`): schema and migrations, opening it, readers, snapshot and QC rules.

Both the rating app (`fangzhi.rating_app`) and the analysis (`fangzhi.evaluate`) import this
package; neither imports the other. See docs/formats.md, "Rating study DB".
"""

from fangzhi.studydb.connection import DUCKDB_CONFIG, connect, open_study, snapshot_path
from fangzhi.studydb.qc import attention_failures, pairwise_attention_failures, pairwise_qc_results, qc_results, raters_failing_attention
from fangzhi.studydb.readers import StudyRead, export_ratings, read_ratings, read_study, read_votes_and_qc, write_snapshot
from fangzhi.studydb.schema import SCHEMA_VERSION, create_schema

__all__ = [
    "DUCKDB_CONFIG", "SCHEMA_VERSION", "StudyRead", "attention_failures", "connect", "create_schema", "export_ratings",
    "open_study", "pairwise_attention_failures", "pairwise_qc_results", "qc_results", "raters_failing_attention", "read_ratings", "read_study",
    "read_votes_and_qc", "snapshot_path", "write_snapshot",
]
