-- VICIdial tables the balancer reads or writes, written from /work/shared/VICIDIAL.md.
--
-- Table and column names, types and defaults follow VICIdial's interface so the balancer runs
-- unchanged against a real VICIdial `asterisk` database; only the columns the balancer (or its
-- tests and demo) can use are declared. On a real cluster these tables already exist and
-- `vici-balancer schema` leaves them untouched.
--
-- Engines are VICIdial's own (its MySQL_AST_CREATE_tables.sql): every table MyISAM, and the
-- live ones (vicidial_hopper, vicidial_auto_calls, vicidial_campaign_server_stats,
-- server_updater) altered to MEMORY afterwards. Neither engine has transactions or row locks:
-- the balancer's writes are ordered and fenced so that they are safe without them
-- (docs/FENCING.md). MEMORY tables cannot hold TEXT/BLOB columns and lose their rows when
-- MariaDB restarts, as on a real cluster. vicidial_hopper has VICIdial's indexes only (its
-- primary key and lead_id). The test suite also runs the balance paths on an InnoDB copy
-- (`schema.install(conn, engine="InnoDB")`), as some sites convert their tables.
--
-- Differences from a stock VICIdial install, on purpose:
--   * Every NOT NULL column the balancer may leave out has a default, so inserts work under
--     strict SQL mode (STRICT_TRANS_TABLES, MariaDB's default) - VICIdial leaves a few without.
--   * TIMESTAMP columns spell out DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP: VICIdial
--     relies on MySQL's old implicit behaviour for the first TIMESTAMP column, which MariaDB 10.10+
--     (explicit_defaults_for_timestamp=ON) no longer applies.
--
-- Only CREATE TABLE IF NOT EXISTS statements belong here (balancer/db/schema.py parses them).

-- One row per Asterisk server of the cluster.
CREATE TABLE IF NOT EXISTS servers (
    server_id VARCHAR(10) NOT NULL,
    server_description VARCHAR(255),
    server_ip VARCHAR(15) NOT NULL,
    active ENUM('Y','N'),
    asterisk_version VARCHAR(20) DEFAULT '1.4.21.2',
    max_vicidial_trunks SMALLINT DEFAULT 23,
    telnet_host VARCHAR(20) NOT NULL DEFAULT 'localhost',
    telnet_port INT NOT NULL DEFAULT 5038,
    ASTmgrUSERNAME VARCHAR(20) NOT NULL DEFAULT 'cron',
    ASTmgrSECRET VARCHAR(20) NOT NULL DEFAULT '1234',
    local_gmt VARCHAR(6) DEFAULT '-5.00',
    answer_transfer_agent VARCHAR(20) NOT NULL DEFAULT '8365',
    ext_context VARCHAR(20) NOT NULL DEFAULT 'default',
    vicidial_balance_active ENUM('Y','N') DEFAULT 'N',
    balance_trunks_offlimits SMALLINT UNSIGNED DEFAULT 0,
    active_asterisk_server ENUM('Y','N') DEFAULT 'Y',
    outbound_calls_per_second SMALLINT UNSIGNED DEFAULT 5,
    sysload INT NOT NULL DEFAULT 0,
    channels_total SMALLINT UNSIGNED NOT NULL DEFAULT 0,
    cpu_idle_percent SMALLINT UNSIGNED NOT NULL DEFAULT 0,
    vicidial_balance_rank TINYINT UNSIGNED DEFAULT 0,
    active_agent_login_server ENUM('Y','N') DEFAULT 'Y',
    routing_prefix VARCHAR(10) DEFAULT '13',
    external_server_ip VARCHAR(100) DEFAULT '',
    active_twin_server_ip VARCHAR(15) DEFAULT '',
    conf_engine ENUM('MEETME','CONFBRIDGE') DEFAULT 'MEETME',
    UNIQUE KEY server_ip (server_ip),
    UNIQUE KEY server_id (server_id)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

-- One row: cluster-wide switches and the balance process's pace.
CREATE TABLE IF NOT EXISTS system_settings (
    version VARCHAR(50),
    db_schema_version INT UNSIGNED DEFAULT 0,
    outbound_autodial_active ENUM('1','0') DEFAULT '1',
    outbound_calls_per_second SMALLINT UNSIGNED DEFAULT 10,
    disable_auto_dial ENUM('0','1') DEFAULT '0',
    call_limit_24hour ENUM('0','1') DEFAULT '0',
    pllb_grouping_limit SMALLINT DEFAULT 100
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

-- Demand: calls a campaign wanted on a server but could not place for lack of lines.
CREATE TABLE IF NOT EXISTS vicidial_campaign_server_stats (
    campaign_id VARCHAR(20) NOT NULL,
    server_ip VARCHAR(15) NOT NULL,
    update_time TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
    local_trunk_shortage SMALLINT UNSIGNED DEFAULT 0,
    UNIQUE KEY campaign_server (campaign_id, server_ip),
    KEY server_ip (server_ip),
    KEY update_time (update_time)
) ENGINE=MEMORY DEFAULT CHARSET=utf8mb4;

-- Lines reserved on a server for one campaign (MAXIMUM_LIMIT also caps the campaign there).
CREATE TABLE IF NOT EXISTS vicidial_server_trunks (
    server_ip VARCHAR(15) NOT NULL,
    campaign_id VARCHAR(20) NOT NULL,
    dedicated_trunks SMALLINT UNSIGNED DEFAULT 0,
    trunk_restriction ENUM('MAXIMUM_LIMIT','OVERFLOW_ALLOWED') DEFAULT 'OVERFLOW_ALLOWED',
    KEY server_campaign (server_ip, campaign_id),
    KEY campaign_id (campaign_id)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

-- Calls in progress that VICIdial placed; balance calls have call_type 'OUTBALANCE'.
CREATE TABLE IF NOT EXISTS vicidial_auto_calls (
    auto_call_id INT UNSIGNED NOT NULL AUTO_INCREMENT,
    server_ip VARCHAR(15) NOT NULL,
    campaign_id VARCHAR(20),
    status ENUM('SENT','RINGING','LIVE','XFER','PAUSED','CLOSER','BUSY','DISCONNECT','IVR'),
    lead_id INT UNSIGNED NOT NULL DEFAULT 0,
    uniqueid VARCHAR(20),
    callerid VARCHAR(20),
    channel VARCHAR(100),
    phone_code VARCHAR(10),
    phone_number VARCHAR(18),
    call_time DATETIME,
    call_type ENUM('IN','OUT','OUTBALANCE') DEFAULT 'OUT',
    stage VARCHAR(20) DEFAULT 'START',
    last_update_time TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
    alt_dial VARCHAR(6) DEFAULT 'NONE',
    queue_priority TINYINT DEFAULT 0,
    PRIMARY KEY (auto_call_id),
    KEY server_campaign_type (server_ip, campaign_id, call_type),
    KEY campaign_type (campaign_id, call_type),
    KEY call_type (call_type),
    KEY callerid (callerid),
    KEY uniqueid (uniqueid),
    KEY call_time (call_time)
) ENGINE=MEMORY DEFAULT CHARSET=utf8mb4;

-- The queue of AMI commands each server's sender script picks up (status 'NEW', own server_ip).
CREATE TABLE IF NOT EXISTS vicidial_manager (
    man_id INT UNSIGNED NOT NULL AUTO_INCREMENT,
    uniqueid VARCHAR(20),
    entry_date DATETIME,
    status ENUM('NEW','QUEUE','SENT','UPDATED','DEAD'),
    response ENUM('Y','N'),
    server_ip VARCHAR(15) NOT NULL,
    channel VARCHAR(100),
    action VARCHAR(20),
    callerid VARCHAR(20),
    cmd_line_b VARCHAR(100),
    cmd_line_c VARCHAR(100),
    cmd_line_d VARCHAR(200),
    cmd_line_e VARCHAR(100),
    cmd_line_f VARCHAR(100),
    cmd_line_g VARCHAR(100),
    cmd_line_h VARCHAR(100),
    cmd_line_i VARCHAR(50),
    cmd_line_j VARCHAR(50),
    cmd_line_k VARCHAR(100),
    PRIMARY KEY (man_id),
    KEY serverstat (server_ip, status),
    KEY callerid (callerid),
    KEY uniqueid (uniqueid),
    KEY entry_date (entry_date)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS vicidial_campaigns (
    campaign_id VARCHAR(8) NOT NULL,
    campaign_name VARCHAR(40),
    active ENUM('Y','N'),
    dial_timeout TINYINT UNSIGNED DEFAULT 60,
    dial_prefix VARCHAR(20) DEFAULT '9',
    campaign_cid VARCHAR(20) DEFAULT '0000000000',
    campaign_vdad_exten VARCHAR(20) DEFAULT '8368',
    omit_phone_code ENUM('Y','N') DEFAULT 'N',
    queue_priority TINYINT DEFAULT 50,
    auto_alt_dial ENUM('NONE','ALT_ONLY','ADDR3_ONLY','ALT_AND_ADDR3','ALT_AND_EXTENDED',
        'ALT_AND_ADDR3_AND_EXTENDED','EXTENDED_ONLY','MULTI_LEAD') DEFAULT 'NONE',
    campaign_calldate DATETIME,
    use_custom_cid ENUM('Y','N','AREACODE','USER_CUSTOM_1','USER_CUSTOM_2','USER_CUSTOM_3',
        'USER_CUSTOM_4','USER_CUSTOM_5') DEFAULT 'N',
    pllb_grouping ENUM('DISABLED','ONE_SERVER_ONLY','CASCADING') DEFAULT 'DISABLED',
    pllb_grouping_limit SMALLINT DEFAULT 50,
    PRIMARY KEY (campaign_id)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS vicidial_campaign_stats (
    campaign_id VARCHAR(20) NOT NULL,
    update_time TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
    balance_trunk_fill SMALLINT UNSIGNED DEFAULT 0,
    PRIMARY KEY (campaign_id)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

-- Logged-in agents; an extension starting with 'R' is a remote agent.
CREATE TABLE IF NOT EXISTS vicidial_live_agents (
    live_agent_id INT UNSIGNED NOT NULL AUTO_INCREMENT,
    user VARCHAR(20),
    server_ip VARCHAR(15) NOT NULL,
    conf_exten VARCHAR(20),
    extension VARCHAR(100),
    status ENUM('READY','QUEUE','INCALL','PAUSED','CLOSER','MQUEUE') DEFAULT 'PAUSED',
    lead_id INT UNSIGNED NOT NULL DEFAULT 0,
    campaign_id VARCHAR(8),
    last_call_time DATETIME,
    last_update_time TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
    dial_campaign_id VARCHAR(8) DEFAULT '',
    PRIMARY KEY (live_agent_id),
    KEY campaign_id (campaign_id),
    KEY dial_campaign_id (dial_campaign_id),
    KEY server_ip (server_ip),
    KEY last_update_time (last_update_time)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

-- Leads ready to dial.
CREATE TABLE IF NOT EXISTS vicidial_hopper (
    hopper_id INT UNSIGNED NOT NULL AUTO_INCREMENT,
    lead_id INT UNSIGNED NOT NULL,
    campaign_id VARCHAR(8),
    status ENUM('READY','QUEUE','INCALL','DONE','HOLD','DNC','RHOLD','RQUEUE') DEFAULT 'READY',
    user VARCHAR(20),
    list_id BIGINT UNSIGNED NOT NULL DEFAULT 0,
    gmt_offset_now DECIMAL(4,2) DEFAULT 0.00,
    state VARCHAR(2) DEFAULT '',
    alt_dial VARCHAR(6) DEFAULT 'NONE',
    priority TINYINT DEFAULT 0,
    source VARCHAR(1) DEFAULT '',
    PRIMARY KEY (hopper_id),
    KEY lead_id (lead_id)
) ENGINE=MEMORY DEFAULT CHARSET=utf8mb4;

-- The leads.
CREATE TABLE IF NOT EXISTS vicidial_list (
    lead_id INT UNSIGNED NOT NULL AUTO_INCREMENT,
    entry_date DATETIME,
    modify_date TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
    status VARCHAR(6),
    user VARCHAR(20),
    list_id BIGINT UNSIGNED NOT NULL DEFAULT 0,
    gmt_offset_now DECIMAL(4,2) DEFAULT 0.00,
    called_since_last_reset ENUM('Y','N','Y1','Y2','Y3','Y4','Y5','Y6','Y7','Y8','Y9','Y10','D')
        DEFAULT 'N',
    phone_code VARCHAR(10),
    phone_number VARCHAR(18) NOT NULL DEFAULT '',
    address3 VARCHAR(100),
    state VARCHAR(2),
    alt_phone VARCHAR(12),
    security_phrase VARCHAR(100),
    called_count SMALLINT UNSIGNED DEFAULT 0,
    last_local_call_time DATETIME,
    PRIMARY KEY (lead_id),
    KEY phone_number (phone_number),
    KEY list_id (list_id),
    KEY status (status)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS vicidial_lists (
    list_id BIGINT UNSIGNED NOT NULL,
    list_name VARCHAR(30),
    campaign_id VARCHAR(8),
    active ENUM('Y','N'),
    list_lastcalldate DATETIME,
    campaign_cid_override VARCHAR(20) DEFAULT '',
    dial_prefix VARCHAR(20) DEFAULT '',
    PRIMARY KEY (list_id),
    KEY campaign_id (campaign_id)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

-- One row per Originate placed (VICIdial has no primary key here).
CREATE TABLE IF NOT EXISTS vicidial_dial_log (
    caller_code VARCHAR(30) NOT NULL,
    lead_id INT UNSIGNED DEFAULT 0,
    server_ip VARCHAR(15),
    call_date DATETIME,
    extension VARCHAR(100) DEFAULT '',
    channel VARCHAR(100) DEFAULT '',
    context VARCHAR(100) DEFAULT '',
    timeout MEDIUMINT UNSIGNED DEFAULT 0,
    outbound_cid VARCHAR(100) DEFAULT '',
    sip_hangup_cause SMALLINT DEFAULT 0,
    sip_hangup_reason VARCHAR(50) DEFAULT '',
    uniqueid VARCHAR(20) DEFAULT '',
    KEY caller_code (caller_code),
    KEY lead_id (lead_id),
    KEY call_date (call_date)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS phones (
    extension VARCHAR(100) NOT NULL,
    dialplan_number VARCHAR(20) DEFAULT '',
    server_ip VARCHAR(15) NOT NULL,
    login VARCHAR(15),
    pass VARCHAR(100),
    status VARCHAR(10) DEFAULT 'ACTIVE',
    active ENUM('Y','N') DEFAULT 'Y',
    fullname VARCHAR(50) DEFAULT '',
    protocol ENUM('SIP','PJSIP','Zap','IAX2','EXTERNAL') DEFAULT 'SIP',
    UNIQUE KEY extenserver (extension, server_ip),
    KEY login (login),
    KEY server_ip (server_ip)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

-- A phone alias: one agent login spread over several phone logins (one per server).
CREATE TABLE IF NOT EXISTS phones_alias (
    alias_id VARCHAR(20) NOT NULL,
    alias_name VARCHAR(50),
    logins_list VARCHAR(255),
    PRIMARY KEY (alias_id)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

-- Heartbeat of each server's VICIdial scripts (refreshed about once a second).
CREATE TABLE IF NOT EXISTS server_updater (
    server_ip VARCHAR(15) NOT NULL,
    last_update DATETIME,
    UNIQUE KEY server_ip (server_ip)
) ENGINE=MEMORY DEFAULT CHARSET=utf8mb4;

-- Agent conferences (MeetMe); a row with an empty extension is free.
CREATE TABLE IF NOT EXISTS vicidial_conferences (
    conf_exten INT UNSIGNED NOT NULL,
    server_ip VARCHAR(15) NOT NULL,
    extension VARCHAR(100) DEFAULT '',
    UNIQUE KEY extenserver (conf_exten, server_ip),
    KEY server_extension (server_ip, extension)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

-- The same for a server whose servers.conf_engine is CONFBRIDGE: the agent screen looks here.
CREATE TABLE IF NOT EXISTS vicidial_confbridges (
    conf_exten INT UNSIGNED NOT NULL,
    server_ip VARCHAR(15) NOT NULL,
    extension VARCHAR(100) DEFAULT '',
    UNIQUE KEY extenserver (conf_exten, server_ip),
    KEY server_extension (server_ip, extension)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

-- Carriers; dialplan_entry maps a dial prefix to the carrier's trunk. account_entry and
-- registration_string hold the peer/endpoint definition (the name seen in AMI channel names).
CREATE TABLE IF NOT EXISTS vicidial_server_carriers (
    carrier_id VARCHAR(15) NOT NULL,
    carrier_name VARCHAR(50) NOT NULL DEFAULT '',
    registration_string VARCHAR(255),
    account_entry TEXT,
    protocol ENUM('SIP','PJSIP','PJSIP_WIZ','Zap','IAX2','EXTERNAL') DEFAULT 'SIP',
    dialplan_entry TEXT,
    server_ip VARCHAR(15) NOT NULL,
    active ENUM('Y','N') NOT NULL DEFAULT 'Y',
    carrier_description VARCHAR(255),
    UNIQUE KEY carrier_id (carrier_id),
    KEY server_ip (server_ip)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

-- The four call-count tables VICIdial writes for every call it places.
-- call_alt is VARCHAR rather than an ENUM so 'MAIN' and any 'X<n>' alt number pass strict mode.
CREATE TABLE IF NOT EXISTS vicidial_dial_cid_log (
    caller_code VARCHAR(30) NOT NULL,
    call_date DATETIME,
    call_type ENUM('OUT','OUTBALANCE','MANUAL','OVERRIDE','3WAY') DEFAULT 'OUT',
    call_alt VARCHAR(10) DEFAULT 'NONE',
    outbound_cid VARCHAR(20) DEFAULT '',
    outbound_cid_type VARCHAR(20) DEFAULT '',
    KEY caller_code (caller_code),
    KEY call_date (call_date)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS vicidial_lead_24hour_calls (
    lead_id INT UNSIGNED NOT NULL,
    list_id BIGINT UNSIGNED DEFAULT 0,
    call_date DATETIME,
    phone_number VARCHAR(18),
    phone_code VARCHAR(10),
    state VARCHAR(2),
    call_type ENUM('MANUAL','AUTO','') DEFAULT '',
    KEY lead_id (lead_id),
    KEY call_date (call_date),
    KEY phone_number (phone_number)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS vicidial_lead_call_daily_counts (
    lead_id INT UNSIGNED NOT NULL,
    list_id BIGINT UNSIGNED DEFAULT 0,
    called_count_total SMALLINT UNSIGNED DEFAULT 0,
    called_count_auto SMALLINT UNSIGNED DEFAULT 0,
    called_count_manual SMALLINT UNSIGNED DEFAULT 0,
    modify_date DATETIME,
    UNIQUE KEY lead_id (lead_id),
    KEY list_id (list_id)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS vicidial_phone_number_call_daily_counts (
    phone_number VARCHAR(18) NOT NULL,
    called_count SMALLINT UNSIGNED DEFAULT 0,
    modify_date DATETIME,
    UNIQUE KEY phone_number (phone_number)
) ENGINE=MyISAM DEFAULT CHARSET=utf8mb4;
