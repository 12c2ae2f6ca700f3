-- Model catalog: which model versions serve (and shadow) which traffic, their history,
-- change notifications for the gateways, and API keys.

CREATE TABLE model_deployments (
    deployment_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_name        text NOT NULL CHECK (model_name <> ''),
    model_version     text NOT NULL CHECK (model_version <> ''),
    -- the Triton ensemble that serves this deployment, e.g. fraud_xgb_pipeline
    serving_endpoint  text NOT NULL CHECK (serving_endpoint <> ''),
    traffic_pct       numeric(5, 2) NOT NULL CHECK (traffic_pct BETWEEN 0 AND 100),
    -- online feature groups the model reads, e.g. ["user", "merchant", "context"]
    feature_groups    jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(feature_groups) = 'array'),
    -- what to serve when features or Triton are unavailable
    fallback_config   jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(fallback_config) = 'object'),
    is_shadow         boolean NOT NULL DEFAULT false,
    -- share of requests mirrored to a shadow deployment
    shadow_sample_pct numeric(5, 2) NOT NULL DEFAULT 100
                      CHECK (shadow_sample_pct BETWEEN 0 AND 100),
    deployed_at       timestamptz NOT NULL DEFAULT now(),
    is_active         boolean NOT NULL DEFAULT true
);

-- one active production and one active shadow row per model version; retired rows
-- (is_active = false) stay for the record
CREATE UNIQUE INDEX model_deployments_active_key
    ON model_deployments (model_name, model_version, is_shadow)
    WHERE is_active;

CREATE INDEX model_deployments_active_model_idx
    ON model_deployments (model_name)
    WHERE is_active;

-- Append-only log written by whoever changes the catalog (deploy, promote, rollback, ...).
-- No foreign key: history outlives deleted deployments.
CREATE TABLE model_deployment_history (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    deployment_id bigint,
    model_name    text NOT NULL,
    action        text NOT NULL,
    detail        jsonb NOT NULL DEFAULT '{}',
    at            timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX model_deployment_history_model_at_idx
    ON model_deployment_history (model_name, at);

-- Every change of a deployment row notifies channel model_catalog with
-- {"model_name": ..., "deployment_id": ..., "op": "INSERT" | "UPDATE" | "DELETE"}.
-- Notifications are sent at commit; identical payloads within one transaction are sent once.
CREATE FUNCTION model_deployments_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed model_deployments;
BEGIN
    IF TG_OP = 'DELETE' THEN
        changed := OLD;
    ELSE
        changed := NEW;
    END IF;
    PERFORM pg_notify(
        'model_catalog',
        json_build_object(
            'model_name', changed.model_name,
            'deployment_id', changed.deployment_id,
            'op', TG_OP
        )::text
    );
    -- a renamed deployment changes two models' routes
    IF TG_OP = 'UPDATE' AND OLD.model_name IS DISTINCT FROM NEW.model_name THEN
        PERFORM pg_notify(
            'model_catalog',
            json_build_object(
                'model_name', OLD.model_name,
                'deployment_id', OLD.deployment_id,
                'op', TG_OP
            )::text
        );
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER model_deployments_notify
    AFTER INSERT OR UPDATE OR DELETE ON model_deployments
    FOR EACH ROW EXECUTE FUNCTION model_deployments_notify();

-- API keys of the gateway. key_hash holds a sha256 or scrypt hash, never the key itself.
CREATE TABLE api_keys (
    key_id           text PRIMARY KEY,
    key_hash         text NOT NULL,
    name             text NOT NULL,
    is_admin         boolean NOT NULL DEFAULT false,
    -- requests per second; NULL = no per-key limit
    rate_limit_per_s numeric CHECK (rate_limit_per_s > 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    revoked_at       timestamptz
);
