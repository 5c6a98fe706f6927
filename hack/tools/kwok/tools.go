//go:build tools

// Package tools pins the kwok commands that hack/tools/build.sh builds.
package tools

import (
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
