"""The queue's tables, written once and spelt for each backend (`sqlite.SCHEMA`,
`postgres.MIGRATIONS`): the types and what only a cluster needs (the node that received an
instance, a job's owner and lease, the nodes) are the only differences."""

from __future__ import annotations

_JOBS = """
CREATE TABLE IF NOT EXISTS instances (
    id {id},
    path TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL DEFAULT '',
    transfer_syntax_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    called_ae TEXT NOT NULL DEFAULT '',
    source_ip TEXT NOT NULL DEFAULT '',
    size {big} NOT NULL,
    received_at {real} NOT NULL,
    series_instance_uid TEXT NOT NULL DEFAULT '',
    series_number INTEGER,
    instance_number INTEGER{instance_node}
);
CREATE TABLE IF NOT EXISTS jobs (
    id {id},
    instance_id {big} NOT NULL REFERENCES instances(id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'in_flight', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at {real} NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    updated_at {real} NOT NULL,
    request TEXT NOT NULL DEFAULT '',
    rules_tag TEXT NOT NULL DEFAULT '',
    priority INTEGER NOT NULL DEFAULT 1{job_lease}
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs ({jobs_due});
CREATE INDEX IF NOT EXISTS jobs_instance ON jobs (instance_id);
CREATE INDEX IF NOT EXISTS instances_sop ON instances (sop_instance_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid);
CREATE TABLE IF NOT EXISTS history (
    id {id},
    destination TEXT NOT NULL,
    outcome TEXT NOT NULL,
    syntax TEXT NOT NULL DEFAULT '',
    transfer_syntax_uid TEXT NOT NULL DEFAULT '',
    received_size {big} NOT NULL,
    sent_size {big},
    ratio {real},
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    received_at {real} NOT NULL,
    finished_at {real} NOT NULL,
    study_instance_uid TEXT NOT NULL DEFAULT '',
    series_instance_uid TEXT NOT NULL DEFAULT '',
    sop_instance_uid TEXT NOT NULL,
    sent_sop_instance_uid TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS history_sop ON history (sop_instance_uid);
CREATE INDEX IF NOT EXISTS history_sent_sop ON history (sent_sop_instance_uid);
CREATE INDEX IF NOT EXISTS history_study ON history (study_instance_uid);
CREATE INDEX IF NOT EXISTS history_series ON history (series_instance_uid);
CREATE INDEX IF NOT EXISTS history_finished ON history (finished_at);
CREATE TABLE IF NOT EXISTS commitments (
    id {id},
    transaction_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at {real} NOT NULL,
    deadline {real} NOT NULL,
    duplicate {false},
    state TEXT NOT NULL CHECK (state IN ('pending', 'reporting', 'reported')),
    holder TEXT NOT NULL DEFAULT '',
    held_until {real} NOT NULL DEFAULT 0,{claimed}
    event_type INTEGER,
    reported_at {real}
);
CREATE INDEX IF NOT EXISTS commitments_state ON commitments (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS commitments_transaction ON commitments (transaction_uid);
CREATE TABLE IF NOT EXISTS commitment_instances (
    commitment_id {big} NOT NULL REFERENCES commitments(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    PRIMARY KEY (commitment_id, position)
);{cluster}
"""

# storage commitment relayed to the destinations ([commitment] mode = "relay")
_RELAYS = """
CREATE TABLE IF NOT EXISTS relays (
    id {id},
    commitment_id {big} NOT NULL REFERENCES commitments(id) ON DELETE CASCADE,
    destination TEXT NOT NULL,
    transaction_uid TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sending', 'sent', 'answered', 'refused')),
    created_at {real} NOT NULL,
    claimer TEXT NOT NULL DEFAULT '',{claimed}
    answered_at {real}
);
CREATE INDEX IF NOT EXISTS relays_state ON relays (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS relays_commitment ON relays (commitment_id);
CREATE TABLE IF NOT EXISTS relay_instances ({row_id}
    relay_id {big} NOT NULL REFERENCES relays(id) ON DELETE CASCADE,
    commitment_id {big} NOT NULL,
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sent_sop_instance_uid TEXT NOT NULL,
    result INTEGER,
    UNIQUE (commitment_id, destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS relay_instances_relay ON relay_instances (relay_id);
"""

# a row claimed by one process at a time and retried: until when, how often, when next, why not
_CLAIMED = """
    claimed_until {real} NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at {real} NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',"""

_SQLITE = {
    "id": "INTEGER PRIMARY KEY", "big": "INTEGER", "real": "REAL", "false": "INTEGER NOT NULL DEFAULT 0",
    "row_id": "", "instance_node": "", "job_lease": "", "cluster": "",
    "jobs_due": "destination, state, next_attempt_at",
}
_POSTGRES = {
    "id": "BIGSERIAL PRIMARY KEY", "big": "BIGINT", "real": "DOUBLE PRECISION", "false": "BOOLEAN NOT NULL DEFAULT FALSE",
    "row_id": "\n    id BIGSERIAL PRIMARY KEY,",
    "instance_node": ",\n    node TEXT NOT NULL DEFAULT ''",
    "job_lease": ",\n    owner TEXT NOT NULL DEFAULT '',\n    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0",
    "cluster": """
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner) WHERE state = 'in_flight';
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL
);""",
    "jobs_due": "destination, state, priority, next_attempt_at",
}



def _spelt(template: str, tokens: dict[str, str]) -> str:
    return template.format(**tokens, claimed=_CLAIMED.format(**tokens))


SQLITE = _spelt(_JOBS, _SQLITE) + _spelt(_RELAYS, _SQLITE)
# PostgreSQL's schema versions: each entry brings it from version (index) to version (index + 1)
POSTGRES_MIGRATIONS: tuple[str, ...] = (_spelt(_JOBS, _POSTGRES), _spelt(_RELAYS, _POSTGRES))
