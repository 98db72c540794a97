"""The throwaway PostgreSQL server fixture: serves queries, stops, and starts again."""

from __future__ import annotations

import psycopg
import pytest

from tests.pg_cluster import PgCluster


def select_one(cluster: PgCluster, dbname: str) -> int:
    with psycopg.connect(cluster.conninfo(dbname), connect_timeout=10) as conn:
        row = conn.execute("select 1").fetchone()
    assert row is not None
    return int(row[0])


def test_cluster_serves_stops_and_starts_again(pg_cluster: PgCluster) -> None:
    assert (
        pg_cluster.url("smoke")
        == f"postgresql+psycopg://postgres@127.0.0.1:{pg_cluster.port}/smoke"
    )
    pg_cluster.create_database("smoke")
    assert select_one(pg_cluster, "smoke") == 1

    pg_cluster.stop()
    try:
        with pytest.raises(psycopg.OperationalError):
            select_one(pg_cluster, "smoke")
    finally:
        # The cluster is shared by the session: leave it running whatever happened.
        pg_cluster.start()
    assert select_one(pg_cluster, "smoke") == 1
