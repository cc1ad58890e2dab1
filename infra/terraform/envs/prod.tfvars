# terraform apply -var-file=envs/prod.tfvars -var project=YOUR-PROD-PROJECT
environment             = "prod"
region                  = "us-central1"
artifact_retention_days = 90
deploy_target           = "vertex"
drift_threshold         = 0.1
psi_threshold           = 0.2
label_drift_threshold   = 0.1
pipeline_template_uri   = "https://us-central1-kfp.pkg.dev/YOUR-PROD-PROJECT/torchship-prod-pipelines/torchship/0.1.0"
schedule_cron           = "0 3 * * 1"
schedule_time_zone      = "Europe/Amsterdam"
# The scheduled run: the newest data under the data bucket's prefix, deployed where the trigger
# reads the reference (deploy_target above).
schedule_parameter_values = {
  data_source   = "gs://YOUR-PROD-PROJECT-torchship-prod-data/incoming/"
  deploy_target = "vertex"
  deploy_settings = {
    project            = "YOUR-PROD-PROJECT"
    location           = "us-central1"
    model_display_name = "torchship"
    serving_image_uri  = "us-central1-docker.pkg.dev/YOUR-PROD-PROJECT/torchship-prod/tritonserver:25.10"
  }
}
