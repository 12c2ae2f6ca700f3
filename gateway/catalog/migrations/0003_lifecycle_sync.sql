-- MLflow rollout: webhook deliveries received (dedupe by delivery id) and the registry
-- states the deployer applied, so each MLflow version / alias assignment is acted on once
-- whether the webhook or the reconcile loop sees it first.

CREATE TABLE mlflow_webhook_deliveries (
    -- X-MLflow-Delivery-Id; a redelivery with the same id is answered "duplicate"
    delivery_id   text PRIMARY KEY CHECK (delivery_id <> ''),
    -- <entity>.<action>, e.g. model_version.created, model_version_alias.created
    event         text NOT NULL,
    model_name    text NOT NULL DEFAULT '',
    model_version integer,
    alias         text,
    received_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX mlflow_webhook_deliveries_received_at_idx
    ON mlflow_webhook_deliveries (received_at);

-- Append-only record of registry states applied (or refused). kind is 'created' for a new
-- version, 'alias:<name>' for an alias assignment; model_version is NULL for an alias
-- deletion. The state of an alias is its newest row.
CREATE TABLE registry_applied (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_name    text NOT NULL CHECK (model_name <> ''),
    kind          text NOT NULL CHECK (kind = 'created' OR kind LIKE 'alias:_%'),
    model_version integer CHECK (model_version > 0),
    -- pending (claimed, deploy running), then e.g. promoted, canary, shadow, unchanged,
    -- failed, ignored, superseded, alias_deleted
    outcome       text NOT NULL,
    -- mlflow-webhook | mlflow-reconcile
    trigger       text NOT NULL,
    -- delivery id, run id, deploy outcome or error
    detail        jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object'),
    applied_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (kind LIKE 'alias:%' OR model_version IS NOT NULL)
);

-- a version's creation is applied once: the first INSERT wins, the others conflict
CREATE UNIQUE INDEX registry_applied_created_key
    ON registry_applied (model_name, model_version)
    WHERE kind = 'created';

CREATE INDEX registry_applied_model_kind_idx
    ON registry_applied (model_name, kind, id);
