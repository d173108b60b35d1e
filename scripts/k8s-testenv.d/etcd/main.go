// Command etcd runs the etcd server with etcd's own command-line flags, as
// the etcd binary of the same release does.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
