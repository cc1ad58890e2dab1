# terraform apply -var-file=envs/dev.tfvars -var project=YOUR-DEV-PROJECT
environment             = "dev"
region                  = "us-central1"
artifact_retention_days = 14
pipeline_template_uri   = "https://us-central1-kfp.pkg.dev/YOUR-DEV-PROJECT/torchship-dev-pipelines/torchship/latest"
schedule_cron           = ""
