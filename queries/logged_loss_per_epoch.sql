-- Only logged values: no replay. val_acc (per epoch) joins the per-step loss on its epoch.
SELECT epoch, avg(loss) AS mean_loss, any_value(val_acc) AS val_acc
FROM run_1
GROUP BY epoch
ORDER BY epoch
