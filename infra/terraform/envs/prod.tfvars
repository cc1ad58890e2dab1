# terraform apply -var-file=envs/prod.tfvars -var project=YOUR-PROD-PROJECT
environment             = "prod"
region                  = "us-central1"
artifact_retention_days = 90
drift_threshold         = 0.5
pipeline_template_uri   = "https://us-central1-kfp.pkg.dev/YOUR-PROD-PROJECT/torchship-prod-pipelines/torchship/0.1.0"
schedule_cron           = "0 3 * * 1"
schedule_time_zone      = "Europe/Amsterdam"
