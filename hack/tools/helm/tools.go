//go:build tools

// Package tools pins the helm commands that hack/tools/build.sh builds.
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
