//go:build tools

// Package tools pins crane, which hack/images/build.sh uses to assemble OCI image archives
// without a container engine or registry.
package tools

import (
	_ "github.com/google/go-containerregistry/cmd/crane"
)
