output "pipeline_root" {
  value = "gs://${module.bucket.name}/pipeline-root"
}

output "docker_repository" {
  value = module.registry.docker_repository
}

output "pipeline_template_host" {
  description = "Pass to `torchship publish --host`."
  value       = module.registry.kfp_host
}

output "pipeline_service_account" {
  value = module.service_account.email
}
