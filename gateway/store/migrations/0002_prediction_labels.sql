-- Ground truth from POST /feedback (topic prediction-labels). One row per (request_id, source):
-- a later label from the same source replaces the earlier one. A label may arrive before its
-- prediction; reads join the two at query time.
CREATE TABLE IF NOT EXISTS prediction_labels
(
    request_id   String,
    source       LowCardinality(String),
    label        String,
    label_value  Float64,
    observed_at  DateTime64(3, 'UTC'),
    received_at  DateTime64(3, 'UTC'),
    inserted_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(received_at)
PARTITION BY toYYYYMM(received_at)
ORDER BY (request_id, source)
TTL toDateTime(received_at) + INTERVAL 400 DAY;
