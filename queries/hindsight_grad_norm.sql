-- The gradient norm, never logged by the demo, over its last two epochs.
-- A step-level value: the planner re-executes epochs 6 and 7 from the nearest earlier checkpoint.
SELECT epoch, avg(grad_norm) AS mean_grad_norm, max(grad_norm) AS max_grad_norm
FROM run_1
WHERE epoch >= 6
GROUP BY epoch
ORDER BY epoch
