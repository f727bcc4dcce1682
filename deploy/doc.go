// Package deploy holds deployment files; its test checks they parse.
package deploy
