-- The balancer's own tables (prefix vb_), installed beside VICIdial's in the same database.
-- Only CREATE TABLE IF NOT EXISTS statements belong here (balancer/db/schema.py parses them).

-- Every decision the balancer takes, with its reason: why a call went (or did not go) somewhere.
CREATE TABLE IF NOT EXISTS vb_decision_log (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    decided_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    cycle_id VARCHAR(40) NOT NULL DEFAULT '',
    kind VARCHAR(20) NOT NULL COMMENT 'balance, assign_phone, login_flag, failover, drain',
    campaign_id VARCHAR(20) NOT NULL DEFAULT '',
    lead_id INT UNSIGNED NULL,
    server_ip VARCHAR(15) NOT NULL DEFAULT '',
    carrier_id VARCHAR(15) NOT NULL DEFAULT '',
    outcome VARCHAR(20) NOT NULL DEFAULT '',
    reason VARCHAR(255) NOT NULL DEFAULT '',
    details TEXT NULL,
    epoch BIGINT UNSIGNED NULL COMMENT 'leader epoch that wrote a balance/failover row',
    PRIMARY KEY (id),
    KEY decided_at (decided_at),
    KEY campaign_decided (campaign_id, decided_at),
    KEY server_decided (server_ip, decided_at),
    KEY epoch (epoch)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- The servers.active_agent_login_server flags the balancer itself changed, so that it only ever
-- restores its own changes and never overrides an administrator's 'N'.
CREATE TABLE IF NOT EXISTS vb_login_flags (
    server_ip VARCHAR(15) NOT NULL,
    set_to ENUM('Y','N') NOT NULL,
    previous ENUM('Y','N') NULL COMMENT 'value before the balancer changed it; NULL if it was NULL',
    reason VARCHAR(255) NOT NULL DEFAULT '',
    changed_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (server_ip)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Balance calls re-placed on the next carrier of their route after failing on a trunk before
-- answer (per-call failover). The primary key is the failed call's caller code: a call is
-- re-placed at most once, whichever daemon sees the failure; a failed retry (found by
-- retry_caller_code) is never re-placed again.
CREATE TABLE IF NOT EXISTS vb_call_retries (
    caller_code VARCHAR(20) NOT NULL COMMENT 'the failed call',
    retry_caller_code VARCHAR(20) NOT NULL COMMENT 'the call that replaced it',
    lead_id INT UNSIGNED NOT NULL,
    server_ip VARCHAR(15) NOT NULL,
    failed_carrier VARCHAR(15) NOT NULL DEFAULT '',
    retry_carrier VARCHAR(15) NOT NULL DEFAULT '',
    hangup_cause SMALLINT UNSIGNED NOT NULL DEFAULT 0,
    retried_at DATETIME NOT NULL,
    state ENUM('placing','placed','undone') NOT NULL DEFAULT 'placed'
        COMMENT 'placing until its Originate is written; the repair step settles the rest',
    PRIMARY KEY (caller_code),
    KEY retry_caller_code (retry_caller_code),
    KEY retried_at (retried_at),
    KEY state (state)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- The leader fence (docs/FENCING.md): one row per lease name. Taking the lease bumps epoch;
-- every write of a balance call is conditional on this row still holding the writer's epoch,
-- in the same statement. MyISAM on purpose: a statement that reads it holds a table read lock
-- for its whole duration, so a takeover (an UPDATE of this row) can never fall between a
-- writer's check and its write, on VICIdial's MyISAM/MEMORY tables as on InnoDB ones.
-- expires_at is the database's clock (NOW(6)); no other clock is involved.
CREATE TABLE IF NOT EXISTS vb_leader (
    name VARCHAR(40) NOT NULL,
    epoch BIGINT UNSIGNED NOT NULL DEFAULT 0,
    holder VARCHAR(100) NOT NULL DEFAULT '',
    expires_at DATETIME(6) NOT NULL DEFAULT '1970-01-01 00:00:01',
    taken_at DATETIME(6) NULL,
    PRIMARY KEY (name)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

-- Which version of these vb_ tables is installed; one row per version applied.
CREATE TABLE IF NOT EXISTS vb_schema_version (
    version INT NOT NULL,
    applied_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (version)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
