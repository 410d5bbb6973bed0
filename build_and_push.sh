#!/usr/bin/env bash
# Build the GPU serving image (Dockerfile.server) and push it to Amazon ECR.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: build_and_push.sh [options]

Builds Dockerfile.server and pushes it to Amazon ECR: creates the repository if it is missing,
logs Docker in to the registry, builds, tags and pushes.

Options (each also read from the environment variable in brackets):
  --region REGION          AWS region, e.g. us-east-1            [AWS_REGION, AWS_DEFAULT_REGION]
  --account ACCOUNT_ID     12-digit AWS account id               [AWS_ACCOUNT_ID]
                           (default: the caller's, from `aws sts get-caller-identity`)
  --repository NAME        ECR repository name                   [ECR_REPOSITORY] (default: whisper-triton)
  --tag TAG                image tag                             [IMAGE_TAG] (default: latest)
  --ssh-helper             install sagemaker-ssh-helper in the image (build arg INSTALL_SSH_HELPER=true)
  --dry-run                print every command it would run, and run none
  -h, --help               show this help

Credentials come from the AWS CLI's usual sources (profile, environment, instance role); none are
written anywhere by this script.
EOF
}

die() {
  echo "build_and_push.sh: $*" >&2
  exit 2
}

region="${AWS_REGION:-${AWS_DEFAULT_REGION:-}}"
account="${AWS_ACCOUNT_ID:-}"
repository="${ECR_REPOSITORY:-whisper-triton}"
tag="${IMAGE_TAG:-latest}"
ssh_helper=false
dry_run=false

while (($# > 0)); do
  case "$1" in
    --region) [[ $# -ge 2 ]] || die "--region needs a value"; region="$2"; shift 2 ;;
    --account) [[ $# -ge 2 ]] || die "--account needs a value"; account="$2"; shift 2 ;;
    --repository) [[ $# -ge 2 ]] || die "--repository needs a value"; repository="$2"; shift 2 ;;
    --tag) [[ $# -ge 2 ]] || die "--tag needs a value"; tag="$2"; shift 2 ;;
    --ssh-helper) ssh_helper=true; shift ;;
    --dry-run) dry_run=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[[ -n "${region}" ]] || die "no AWS region: pass --region or set AWS_REGION"
[[ "${region}" =~ ^[a-z]{2}(-[a-z]+)+-[0-9]+$ ]] || die "not an AWS region: ${region}"
[[ "${repository}" =~ ^[a-z0-9]+([._/-][a-z0-9]+)*$ ]] || die "not a valid ECR repository name: ${repository}"
[[ "${tag}" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "not a valid image tag: ${tag}"
if [[ -n "${account}" && ! "${account}" =~ ^[0-9]{12}$ ]]; then
  die "not a 12-digit AWS account id: ${account}"
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Print a command, shell-quoted, as it will run.
show() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
}

# Print a command, then run it unless this is a dry run.
run() {
  show "$@"
  if [[ "${dry_run}" == false ]]; then
    "$@"
  fi
}

if [[ -z "${account}" ]]; then
  show aws sts get-caller-identity --query Account --output text
  if [[ "${dry_run}" == true ]]; then
    account="ACCOUNT_ID"
  else
    account="$(aws sts get-caller-identity --query Account --output text)"
    [[ "${account}" =~ ^[0-9]{12}$ ]] || die "could not read the AWS account id (got: ${account})"
  fi
fi

domain="amazonaws.com"
if [[ "${region}" == cn-* ]]; then
  domain="amazonaws.com.cn"
fi
registry="${account}.dkr.ecr.${region}.${domain}"
local_image="${repository}:${tag}"
remote_image="${registry}/${repository}:${tag}"

# 1. the repository, created if missing
show aws ecr describe-repositories --region "${region}" --repository-names "${repository}"
if [[ "${dry_run}" == true ]]; then
  echo "# if it is missing:"
  show aws ecr create-repository --region "${region}" --repository-name "${repository}" \
    --image-scanning-configuration scanOnPush=true
elif ! aws ecr describe-repositories --region "${region}" --repository-names "${repository}" >/dev/null 2>&1; then
  run aws ecr create-repository --region "${region}" --repository-name "${repository}" \
    --image-scanning-configuration scanOnPush=true >/dev/null
fi

# 2. docker login (the password goes through a pipe, never onto a command line or disk)
printf '+ aws ecr get-login-password --region %q | docker login --username AWS --password-stdin %q\n' \
  "${region}" "${registry}"
if [[ "${dry_run}" == false ]]; then
  aws ecr get-login-password --region "${region}" | docker login --username AWS --password-stdin "${registry}"
fi

# 3. build, tag, push
# sagemaker-ssh-helper's agent needs root: an SSH image runs serve as root (SERVE_UID=0), any other as
# the image's unprivileged user
serve_uid=10001
if [[ "${ssh_helper}" == true ]]; then serve_uid=0; fi
run docker build --platform linux/amd64 --file "${here}/Dockerfile.server" \
  --build-arg "INSTALL_SSH_HELPER=${ssh_helper}" --build-arg "SERVE_UID=${serve_uid}" --tag "${local_image}" "${here}"
run docker tag "${local_image}" "${remote_image}"
run docker push "${remote_image}"

echo "# image: ${remote_image}"
