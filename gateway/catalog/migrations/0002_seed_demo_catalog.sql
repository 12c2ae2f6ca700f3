-- The three demo pipelines as active production deployments, unless the model already has
-- one. Fallback: the training set's fraud rate (class prior, ~3.5%) with a 0.5 threshold.

INSERT INTO model_deployments
    (model_name, model_version, serving_endpoint, traffic_pct, feature_groups, fallback_config)
SELECT v.model_name, '1', v.serving_endpoint, 100,
       '["user", "merchant", "context"]'::jsonb,
       '{"type": "class_prior", "score": 0.035, "threshold": 0.5}'::jsonb
FROM (VALUES
    ('fraud_xgb', 'fraud_xgb_pipeline'),
    ('fraud_nn', 'fraud_nn_pipeline'),
    ('fraud_blend', 'fraud_blend_pipeline')
) AS v (model_name, serving_endpoint)
WHERE NOT EXISTS (
    SELECT 1 FROM model_deployments d
    WHERE d.model_name = v.model_name AND d.is_active AND NOT d.is_shadow
)
ON CONFLICT DO NOTHING;
