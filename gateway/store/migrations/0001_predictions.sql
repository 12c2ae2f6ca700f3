-- One row per logged prediction. The log is at-least-once: copies of a record share the
-- sorting key and collapse in merges (read with FINAL for exact counts). Shadow records share
-- the production record's request_id and differ by arm and deployment_id.
CREATE TABLE IF NOT EXISTS predictions
(
    request_id        String,
    arm               LowCardinality(String),
    deployment_id     String,
    ts                DateTime64(3, 'UTC'),
    model_name        LowCardinality(String),
    model_version     LowCardinality(String),
    serving_endpoint  LowCardinality(String),
    door              LowCardinality(String),
    entity_ids        Map(String, String),
    context           String,
    feature_overrides String,
    features          Array(Float32),
    features_hash     String,
    prediction        Nullable(Float64),
    label_class       LowCardinality(String),
    confidence        Nullable(Float64),
    latency_ms        Nullable(Float64),
    stage_latency_ms  Map(String, Float64),
    is_degraded       Bool,
    degraded_reason   LowCardinality(String),
    production        String,
    error_code        LowCardinality(String),
    error_message     String,
    sample_pct        Nullable(Float64),
    schema_version    UInt16,
    source_topic      LowCardinality(String),
    source_partition  Int32,
    source_offset     Int64,
    inserted_at       DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX ts_minmax ts TYPE minmax GRANULARITY 1,
    INDEX model_set model_name TYPE set(64) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMMDD(ts)
ORDER BY (request_id, arm, deployment_id)
TTL toDateTime(ts) + INTERVAL 90 DAY
-- small granules: reads are mostly point lookups by request id (show, joins, replay)
SETTINGS index_granularity = 1024;
